/**
 * `serve --incoming --token-file FILE` (formats/migrate.md §5.1): the incoming token kept in a file the
 * operator owns, so a destination restarted (a crash, a reboot, an upgrade of its host) takes the same token
 * and a replication or migration source resumes without being told a new one. A missing file is created
 * with a new random token (mode 0600, exclusive create); an existing one must be a regular file of ours
 * that no other user may read or write, holding 32 lowercase hex digits (one optional newline).
 */
import { randomBytes } from 'node:crypto';
import { constants, promises as fs } from 'node:fs';
import { KscError } from '../errors.js';
import { createFile } from '../io/create.js';

const TOKEN = /^[0-9a-f]{32}\n?$/;

/** The token in `file`, created when missing; KSC_E_PERMISSION for a file others can reach, KSC_E_INVALID for bad content. */
export async function tokenFromFile(file: string): Promise<string> {
  let fh: fs.FileHandle;
  try {
    fh = await fs.open(file, constants.O_RDONLY | constants.O_NOFOLLOW);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code !== 'ENOENT') throw new KscError('KSC_E_INVALID', `token file ${file}: cannot open it (${code ?? (e as Error).message})`, { cause: e });
    return createTokenFile(file);
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) throw new KscError('KSC_E_INVALID', `token file ${file}: not a regular file`);
    const uid = process.getuid?.() ?? st.uid;
    if (st.uid !== uid) throw new KscError('KSC_E_PERMISSION', `token file ${file}: owned by uid ${st.uid}, not by this user (uid ${uid})`);
    if ((st.mode & 0o077) !== 0) throw new KscError('KSC_E_PERMISSION', `token file ${file}: other users may read or write it (mode ${(st.mode & 0o777).toString(8)}); chmod 600 it`);
    if (st.size > 64) throw new KscError('KSC_E_INVALID', `token file ${file}: expected 32 lowercase hex digits, found ${st.size} bytes`);
    const text = (await fh.readFile()).toString('latin1');
    if (!TOKEN.test(text)) throw new KscError('KSC_E_INVALID', `token file ${file}: expected 32 lowercase hex digits`);
    return text.slice(0, 32);
  } finally {
    await fh.close();
  }
}

async function createTokenFile(file: string): Promise<string> {
  const token = randomBytes(16).toString('hex');
  let fh: fs.FileHandle;
  try {
    fh = await createFile(file, constants.O_WRONLY | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
  } catch (e) {
    throw new KscError('KSC_E_INVALID', `token file ${file}: cannot create it (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`, { cause: e });
  }
  try {
    await fh.writeFile(`${token}\n`);
    await fh.sync();
  } finally {
    await fh.close();
  }
  return token;
}
