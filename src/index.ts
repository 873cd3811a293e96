/** The kscinc library API. */
export { KscError, isKscError, type KscErrorCode } from './errors.js';
export type { BlockDevice, Extent, ExtentState, WriteOptions, ZeroOptions } from './image/types.js';
export { KscImage, type BitmapStatus } from './image/ksc.js';
export { RawDevice } from './image/raw.js';
export { openImage, openKsc, createImage, probeFormat, resolveBackingPath, type OpenImageOptions, type CreateImageOptions, type ImageFormat } from './image/open.js';
export { parseSize, formatSize } from './util/size.js';
export { nativeAvailable } from './io/native.js';
