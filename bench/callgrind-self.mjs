/**
 * Self instruction counts (Ir) of one callgrind output file, by object and by function, with JIT code named
 * from a `node --perf-basic-prof` map when one is given. Names compressed across the dumps of one process
 * (callgrind.out.PID*) are resolved from all of them.
 *
 *   node bench/callgrind-self.mjs callgrind.out.PID.1-01 [/tmp/perf-PID.map|-] [top]
 */
import { readFileSync, readdirSync, existsSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';

const [file, pmap, topArg] = process.argv.slice(2);
const top = Number(topArg ?? 40);
const kinds = { fn: 'fn', cfn: 'fn', ob: 'ob', cob: 'ob', fl: 'fl', fi: 'fl', fe: 'fl', cfi: 'fl', cfl: 'fl' };
const names = { fn: new Map(), ob: new Map(), fl: new Map() };
const pid = /callgrind\.out\.(\d+)/.exec(file)[1];
for (const g of readdirSync(dirname(file)).filter((n) => n.startsWith(`callgrind.out.${pid}`))) {
  for (const line of readFileSync(join(dirname(file), g), 'latin1').split('\n')) {
    const m = /^(c?fn|c?ob|fl|fi|fe|cfi|cfl)=\((\d+)\) (.*)$/.exec(line);
    if (m && !names[kinds[m[1]]].has(m[2])) names[kinds[m[1]]].set(m[2], m[3]);
  }
}
const resolve = (k, v) => {
  const m = /^\((\d+)\)(?: (.*))?$/.exec(v);
  return m ? (m[2] ?? names[kinds[k]].get(m[1]) ?? v) : v;
};
const jit = [];
if (pmap && pmap !== '-' && existsSync(pmap)) {
  for (const line of readFileSync(pmap, 'utf8').split('\n')) {
    const [a, s, ...n] = line.split(' ');
    if (n.length) jit.push([parseInt(a, 16), parseInt(s, 16), n.join(' ')]);
  }
  jit.sort((x, y) => x[0] - y[0]);
}
const jitName = (n) => {
  const m = /^0x([0-9a-f]+)$/.exec(n ?? '');
  if (!m || !jit.length) return n;
  const a = parseInt(m[1], 16);
  let lo = 0;
  let hi = jit.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (jit[mid][0] <= a) lo = mid;
    else hi = mid - 1;
  }
  const j = jit[lo];
  return j[0] <= a && a < j[0] + j[1] ? `JS ${j[2].replace(/file:\/\/\S*\/dist\//, '').replace(/\/\S*\/dist\//, '')}` : n;
};
const byFn = new Map();
const byOb = new Map();
let fn = null;
let ob = null;
let skip = false;
let total = 0;
const add = (m, k, v) => m.set(k, (m.get(k) ?? 0) + v);
for (const line of readFileSync(file, 'latin1').split('\n')) {
  if (!line) continue;
  const c = line[0];
  if ((c >= '0' && c <= '9') || c === '+' || c === '-' || c === '*') {
    if (skip) {
      skip = false; // the inclusive cost of a call: not this function's own
      continue;
    }
    const ir = Number(line.split(' ')[1] ?? 0);
    add(byFn, `${jitName(fn)}  [${basename(ob ?? '?')}]`, ir);
    add(byOb, ob, ir);
    total += ir;
    continue;
  }
  const i = line.indexOf('=');
  const k = line.slice(0, i);
  const v = line.slice(i + 1);
  if (k === 'fn') fn = resolve(k, v);
  else if (k === 'ob') ob = resolve(k, v);
  else if (k === 'calls') skip = true;
}
const pct = (x) => `${((100 * x) / total).toFixed(1).padStart(5)}%`;
console.log(`total ${total.toLocaleString('en')} Ir`);
for (const [k, v] of [...byOb].sort((a, b) => b[1] - a[1]).slice(0, 6)) console.log(`  ${v.toLocaleString('en').padStart(15)} ${pct(v)}  ${k}`);
for (const [k, v] of [...byFn].sort((a, b) => b[1] - a[1]).slice(0, top)) console.log(`  ${v.toLocaleString('en').padStart(15)} ${pct(v)}  ${k}`);
