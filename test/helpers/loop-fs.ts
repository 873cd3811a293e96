import { execFileSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

export interface LoopFsOptions {
  /** The mkfs program (mkfs.ext4, mkfs.xfs) and its arguments before the device. */
  mkfs: string;
  args: string[];
  mib: number;
  /** mount -o OPTIONS. */
  mountOptions?: string;
}

/**
 * A file system made on a loop device over a `mib` MiB file `dir/NAME.fs` and mounted on `dir/NAME` (root
 * only); `undo` gets the unmount and the loop device's release. Returns the device, backing file and mount point.
 */
export function loopFs(dir: string, name: string, o: LoopFsOptions, undo: (step: () => void) => void): { dev: string; backing: string; mnt: string } {
  const backing = join(dir, `${name}.fs`);
  const mnt = join(dir, name);
  mkdirSync(mnt);
  execFileSync('truncate', ['-s', `${o.mib}m`, backing]);
  const dev = execFileSync('losetup', ['-f', '--show', backing]).toString().trim();
  undo(() => execFileSync('losetup', ['-d', dev]));
  execFileSync(o.mkfs, [...o.args, dev], { stdio: 'ignore' });
  execFileSync('mount', [...(o.mountOptions ? ['-o', o.mountOptions] : []), dev, mnt]);
  undo(() => execFileSync('umount', ['-l', mnt]));
  return { dev, backing, mnt };
}
