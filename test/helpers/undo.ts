import { afterAll } from 'vitest';

/**
 * A file's undo list for what its tests set up outside its temporary folder (loop devices, mounts): each
 * pushed step runs after all its tests, the last pushed first; a step that fails does not stop the rest.
 */
export function undoAfterAll(): (step: () => void) => void {
  const steps: (() => void)[] = [];
  afterAll(() => {
    for (const s of steps.splice(0).reverse()) {
      try {
        s();
      } catch {
        // best effort: the rest still runs
      }
    }
  });
  return (step) => void steps.push(step);
}
