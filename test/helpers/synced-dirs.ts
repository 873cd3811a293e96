/**
 * Records the folders syncDir (src/io/durable.js) is called on, for tests that check a name was made durable.
 * A test file mocks the module with it (the mock is hoisted above the file's imports, hence the import
 * inside the factory):
 *
 *   vi.mock('../../src/io/durable.js', async (original) => (await import('../helpers/synced-dirs.js')).recordSyncDirs(original));
 *   const { synced } = await import('../helpers/synced-dirs.js');
 */
type Durable = typeof import('../../src/io/durable.js');

/** Every folder synced, in order, after the real sync returned. */
export const synced: string[] = [];

/** The real module with a syncDir that records each folder once it is synced. */
export async function recordSyncDirs(importOriginal: <T>() => Promise<T>): Promise<Durable> {
  const real = await importOriginal<Durable>();
  return {
    ...real,
    syncDir: async (d: string): Promise<void> => {
      await real.syncDir(d);
      synced.push(d);
    },
  };
}
