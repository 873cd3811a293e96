/**
 * What `kscinc backups` needs of the catalog, imported when it runs (src/cli/backup-commands.ts): a module of
 * the CLI, not repo/catalog.js itself, which the engines import statically. A dynamic import of that one made
 * the bundler move its runtime helpers out of the entry into a chunk of their own, one more file every run loads.
 */
export { listBackups, summarize } from '../repo/catalog.js';
