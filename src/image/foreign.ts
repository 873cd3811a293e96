/**
 * Disk image formats kscinc does not read, recognised by their headers so that a qcow2, vmdk, vhdx, vdi, vpc,
 * qed or LUKS file is refused with a pointer to `qemu-img convert` instead of being taken as a raw disk
 * (which would expose the other format's metadata as disk content and give it a made-up disk UUID).
 * The signatures are the ones the formats' own specifications freeze (and qemu's probes use).
 */
import { KscError } from '../errors.js';

interface Signature {
  name: string;
  /** Offset of the magic from the start of the file. */
  at: number;
  magic: Buffer;
}

const SIGNATURES: Signature[] = [
  { name: 'qcow2', at: 0, magic: Buffer.from([0x51, 0x46, 0x49, 0xfb]) }, // "QFI\xfb" (qcow and qcow2)
  { name: 'qed', at: 0, magic: Buffer.from('QED\0', 'latin1') },
  { name: 'vmdk', at: 0, magic: Buffer.from('KDMV', 'latin1') }, // hosted sparse extent
  { name: 'vmdk', at: 0, magic: Buffer.from('COWD', 'latin1') }, // ESX sparse extent
  { name: 'vmdk', at: 0, magic: Buffer.from('# Disk DescriptorFile', 'latin1') }, // descriptor file
  { name: 'vhdx', at: 0, magic: Buffer.from('vhdxfile', 'latin1') },
  { name: 'vdi', at: 0x40, magic: Buffer.from([0x7f, 0x10, 0xda, 0xbe]) }, // 0xbeda107f little-endian
  { name: 'vpc (vhd)', at: 0, magic: Buffer.from('conectix', 'latin1') }, // dynamic: footer copy first
  { name: 'LUKS', at: 0, magic: Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]) }, // LUKS1 and LUKS2
];

/** Bytes of the file's start that `foreignFormat` looks at. */
export const FOREIGN_PROBE_BYTES = 512;

/**
 * The foreign format `head` (the file's first bytes) and `tail` (its last 512 bytes, or null) show, or null.
 * A fixed-size VHD is raw data followed by a 512-byte footer starting "conectix".
 */
export function foreignFormat(head: Buffer, tail: Buffer | null): string | null {
  for (const s of SIGNATURES) {
    if (head.length >= s.at + s.magic.length && head.subarray(s.at, s.at + s.magic.length).equals(s.magic)) return s.name;
  }
  if (tail && tail.length === 512 && tail.subarray(0, 8).equals(Buffer.from('conectix', 'latin1'))) return 'vpc (vhd)';
  return null;
}

/** The one-line refusal: names the file and the format and says how to convert it. */
export function foreignError(file: string, format: string): KscError {
  if (format === 'LUKS') {
    return new KscError(
      'KSC_E_FORMAT',
      `${file}: is a LUKS-encrypted image, which kscinc does not read (only raw and ksc_inc): decrypt it first, e.g. qemu-img convert --object secret,id=s0,file=KEYFILE --image-opts driver=luks,key-secret=s0,file.filename=${file} -O raw ${file}.raw`,
    );
  }
  const qf = format.startsWith('vpc') ? 'vpc' : format;
  return new KscError('KSC_E_FORMAT', `${file}: is a ${format} image, which kscinc does not read (only raw and ksc_inc): convert it first, e.g. qemu-img convert -f ${qf} -O raw ${file} ${file}.raw`);
}
