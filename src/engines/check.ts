/** The checker lives beside the format it checks: src/image/ksc/check.ts. */
export { checkImage, type CheckReport } from '../image/ksc/check.js';
