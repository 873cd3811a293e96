/**
 * The ksc_inc image (formats/ksc_inc.md). The implementation lives in ./ksc/, split by concern (see
 * ksc/image.ts); this module is the name the rest of the code imports.
 */
export { KscImage, type BitmapStatus, type CreateKscOptions, type OpenKscOptions } from './ksc/image.js';
export type { HandoverRecord } from './ksc/handover.js';
