/** The QMP client moved to src/qmp/client.ts (`kscinc migrate --qmp` uses it); tests import it from here as before. */
export { Qmp, type QmpEvent } from '../../src/qmp/client.js';
