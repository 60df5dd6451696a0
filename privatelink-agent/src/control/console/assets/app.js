// privatelink console: a small page over the REST API. No framework, no build step, nothing
// fetched from elsewhere. Every value from the server goes into the page as text (never as HTML).
'use strict';

let me = null; // { role, account_id, name, csrf } once signed in

// ---- DOM ----------------------------------------------------------------------------------------

function h(tag, attrs, ...kids) {
  const svg = ['svg', 'path', 'line', 'text', 'g', 'polyline', 'circle', 'title'].includes(tag);
  const el = svg ? document.createElementNS('http://www.w3.org/2000/svg', tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.setAttribute('class', v);
    else if (k === 'value' && !svg) el.value = v;
    else if (k === 'checked' && !svg) el.checked = !!v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

const main = () => document.getElementById('main');
function show(...kids) { main().replaceChildren(...kids); }

// ---- API ----------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.code = e.code || 'http_' + status;
    this.field = e.field || null;
  }
}

async function api(method, path, body) {
  const headers = { 'Accept': 'application/json' };
  if (me && me.csrf) headers['X-CSRF-Token'] = me.csrf;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(path, { method, headers, credentials: 'same-origin', body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let data = null;
  if (text && (r.headers.get('content-type') || '').includes('json')) data = JSON.parse(text);
  else data = text;
  if (!r.ok) {
    const err = new ApiError(r.status, data);
    if (r.status === 401 && path !== '/console/session') { me = null; signIn(err.message); }
    throw err;
  }
  return data;
}

const enc = encodeURIComponent;
const get = (p) => api('GET', p);

// Downloads what `path` answers (with the session) as a file.
async function download(path, name) {
  const r = await fetch(path, { headers: { 'X-CSRF-Token': me.csrf }, credentials: 'same-origin' });
  if (!r.ok) throw new ApiError(r.status, await r.json().catch(() => null));
  const url = URL.createObjectURL(await r.blob());
  const a = h('a', { href: url, download: name });
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// ---- values -------------------------------------------------------------------------------------

function mappings(ms) { return (ms || []).map((m) => `${m.protocol} ${m.terminal_port}→${m.service_port}`).join(', '); }
function tags(ts) { return (ts || []).map((t) => `${t.key}=${t.value}`).join(', '); }
function bindings(bs) { return (bs || []).slice().sort((a, b) => a.priority - b.priority).map((b) => `${b.priority}: ${b.security_group_id}`).join(', '); }

// A cell: nested values summarised, never raw JSON.
function cell(key, v) {
  if (v === null || v === undefined) return '';
  if (key === 'port_mappings') return mappings(v);
  if (key === 'tags') return tags(v);
  if (key === 'security_groups') return bindings(v);
  if (key === 'allowlist') return v.map((a) => a.account_id).join(', ');
  if (key === 'rules') return `${v.length} rule${v.length === 1 ? '' : 's'}`;
  if (key === 'health_check') return v.enabled ? `every ${v.interval_secs}s` : 'off';
  if (key === 'ha') return v ? `${v.group} (${v.active ? 'active' : 'standby'})` : '';
  if (key === 'endpoint_flow_limits') return Object.entries(v).map(([k, n]) => `${k}: ${n}`).join(', ');
  if (key === 'state') return h('span', { class: 'state-' + v }, v);
  if (Array.isArray(v)) return v.map((x) => (typeof x === 'object' ? JSON.stringify(x) : x)).join(', ');
  if (typeof v === 'object') return Object.entries(v).map(([k, x]) => `${k}: ${x}`).join(', ');
  if (typeof v === 'boolean') return v ? 'yes' : 'no';
  return String(v);
}

function parseTags(s) {
  return s.split(',').map((t) => t.trim()).filter(Boolean).map((t) => {
    const i = t.indexOf('=');
    return i < 0 ? { key: t, value: '' } : { key: t.slice(0, i).trim(), value: t.slice(i + 1).trim() };
  });
}
const words = (s) => s.split(/[\s,]+/).map((x) => x.trim()).filter(Boolean);

// ---- forms --------------------------------------------------------------------------------------

// A form of labelled fields; `submit(values)` runs on submit, and an API error appears next to the
// field it names (or above the form).
function form({ fields, submitLabel, submit, cls }) {
  const top = h('div', { class: 'formerr', role: 'alert' });
  const f = h('form', { class: cls || 'grid', novalidate: true });
  const inputs = {};
  for (const fd of fields) {
    const id = 'f-' + fd.name + '-' + Math.random().toString(36).slice(2, 8);
    let input;
    if (fd.type === 'select') {
      input = h('select', { id, name: fd.name }, (fd.options || []).map(([v, l]) => h('option', { value: v }, l)));
      if (fd.value !== undefined) input.value = fd.value;
    } else if (fd.type === 'checkbox') {
      input = h('input', { id, name: fd.name, type: 'checkbox', checked: fd.value });
    } else if (fd.type === 'custom') {
      input = fd.element;
      input.id = id;
    } else {
      input = h('input', { id, name: fd.name, type: fd.type || 'text', value: fd.value ?? '', placeholder: fd.placeholder || '', autocomplete: 'off' });
    }
    input.dataset.field = fd.name;
    const err = h('span', { class: 'err', 'data-err': fd.name });
    inputs[fd.name] = input;
    f.append(h('label', { for: id }, fd.label), h('div', {}, input, fd.help ? h('div', { class: 'help' }, fd.help) : null, err));
  }
  const button = h('button', { class: 'primary', type: 'submit' }, submitLabel || 'Save');
  f.append(h('span'), h('div', {}, button));
  f.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    top.textContent = '';
    f.querySelectorAll('.err').forEach((e) => { e.textContent = ''; });
    f.querySelectorAll('.invalid').forEach((e) => e.classList.remove('invalid'));
    const values = {};
    for (const [k, el] of Object.entries(inputs)) values[k] = el.type === 'checkbox' ? el.checked : (el.value ?? '');
    button.disabled = true;
    try { await submit(values, inputs); } catch (e) { fieldError(f, top, e); } finally { button.disabled = false; }
  });
  return h('div', {}, top, f);
}

// Shows `e` next to the field it names: `port_mappings[1].terminal_port` goes to the field
// `port_mappings` when there is no closer one.
function fieldError(f, top, e) {
  const msg = e instanceof ApiError ? `${e.message} (${e.code})` : String(e.message || e);
  if (e instanceof ApiError && e.field) {
    const names = [e.field, e.field.split(/[[.]/)[0]];
    for (const n of names) {
      const slot = f.querySelector(`[data-err="${CSS.escape(n)}"]`);
      if (slot) {
        slot.textContent = msg;
        const input = f.querySelector(`[data-field="${CSS.escape(n)}"]`);
        if (input) input.classList.add('invalid');
        return;
      }
    }
  }
  top.textContent = msg;
}

// A button that runs `act` and shows a failure beside itself.
function action(label, act, cls) {
  const err = h('span', { class: 'err' });
  const b = h('button', { type: 'button', class: cls || '' }, label);
  b.addEventListener('click', async () => {
    err.textContent = '';
    b.disabled = true;
    try { await act(); } catch (e) { err.textContent = e instanceof ApiError ? `${e.message} (${e.code})` : String(e.message || e); } finally { b.disabled = false; }
  });
  return h('span', {}, b, err);
}

function confirmAct(label, question, act) {
  return action(label, async () => { if (window.confirm(question)) await act(); }, 'danger');
}

function kv(pairs) {
  return h('dl', { class: 'kv' }, pairs.filter(Boolean).map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
}

// Results of a batch: one line per item that failed.
function results(out, res, key) {
  const bad = (res.results || []).filter((r) => !r.ok);
  out.replaceChildren(bad.length ? h('div', { class: 'formerr' }, bad.map((r) => h('div', {}, `${r[key]}: ${r.error}`))) : h('div', { class: 'notice' }, `${(res.results || []).length} done`));
}

// ---- lists --------------------------------------------------------------------------------------

// A list page: search, filters, chosen columns, paging and CSV export over an API list.
// `exportable`: the fields the CSV export takes (times as `created_at`, Unix seconds).
function list({ key, title, path, exportPath, exportable, columns, defaults, link, filters, toolbar }) {
  const saved = JSON.parse(localStorage.getItem('cols:' + key) || 'null');
  const st = { search: '', page: 1, per_page: 25, cols: saved || defaults, filter: {} };
  const body = h('div');
  const info = h('span', { class: 'muted' });
  const err = h('div', { class: 'formerr' });
  const search = h('input', { type: 'search', placeholder: 'Search by id or name', 'aria-label': 'search' });
  search.addEventListener('input', () => { st.search = search.value; st.page = 1; load(); });
  const filterEls = (filters || []).map((fl) => {
    const s = h('select', { 'aria-label': fl.label }, h('option', { value: '' }, fl.label + ': any'), fl.options.map((o) => h('option', { value: o }, o)));
    s.addEventListener('change', () => { st.filter[fl.key] = s.value; render(); });
    return s;
  });
  const colBox = h('details', {}, h('summary', {}, 'Columns'), h('div', { class: 'cols' }, columns.map((c) => {
    const cb = h('input', { type: 'checkbox', checked: st.cols.includes(c) });
    cb.addEventListener('change', () => {
      st.cols = columns.filter((x) => (x === c ? cb.checked : st.cols.includes(x)));
      localStorage.setItem('cols:' + key, JSON.stringify(st.cols));
      render();
    });
    return h('label', {}, cb, ' ', c);
  })));
  const prev = h('button', { type: 'button' }, '‹ Previous');
  const next = h('button', { type: 'button' }, 'Next ›');
  prev.addEventListener('click', () => { st.page--; load(); });
  next.addEventListener('click', () => { st.page++; load(); });
  const per = h('select', { 'aria-label': 'per page' }, [10, 25, 50, 100].map((n) => h('option', { value: n }, `${n} per page`)));
  per.value = '25';
  per.addEventListener('change', () => { st.per_page = +per.value; st.page = 1; load(); });
  let data = { items: [], total: 0 };
  function render() {
    const rows = data.items.filter((it) => Object.entries(st.filter).every(([k, v]) => !v || String(it[k]) === v));
    const head = h('tr', {}, st.cols.map((c) => h('th', {}, c)));
    const trs = rows.map((it) => h('tr', { 'data-id': it.id }, st.cols.map((c) => {
      const v = cell(c, it[c]);
      return h('td', { 'data-col': c }, c === 'id' && link ? h('a', { href: link(it) }, v) : v);
    })));
    body.replaceChildren(h('table', { class: 'list' }, h('thead', {}, head), h('tbody', {}, trs.length ? trs : h('tr', {}, h('td', { colspan: st.cols.length, class: 'muted' }, 'Nothing here yet.')))));
    const pages = Math.max(1, Math.ceil(data.total / st.per_page));
    info.textContent = `${data.total} in all · page ${st.page} of ${pages}`;
    prev.disabled = st.page <= 1;
    next.disabled = st.page >= pages;
  }
  // Only the answer to the latest request is shown (typing in the search box asks many times).
  let asked = 0;
  async function load() {
    const mine = ++asked;
    try {
      const d = await get(`${path}?page=${st.page}&per_page=${st.per_page}` + (st.search ? `&search=${enc(st.search)}` : ''));
      if (mine !== asked) return;
      err.textContent = '';
      data = d;
      render();
    } catch (e) { if (mine === asked) err.textContent = e.message; }
  }
  const exportFields = () => st.cols.map((c) => (c === 'created_time' ? 'created_at' : c)).filter((c) => exportable.includes(c));
  const exp = exportPath ? action('Export CSV', () => download(`${exportPath}?fields=${enc(exportFields().join(','))}` + (st.search ? `&search=${enc(st.search)}` : ''), `${key}.csv`)) : null;
  load();
  return h('div', {}, h('h1', {}, title), h('div', { class: 'toolbar' }, search, filterEls, colBox, h('span', { class: 'grow' }), exp, toolbar || null), err, body, h('div', { class: 'toolbar' }, prev, next, per, info));
}

// ---- monitoring ---------------------------------------------------------------------------------

const METRICS = [
  ['fwd_bytes', 'Bytes in (consumer → service)'], ['rev_bytes', 'Bytes out (service → consumer)'],
  ['fwd_packets', 'Packets in'], ['rev_packets', 'Packets out'],
  ['new_connections', 'New connections'], ['max_active_connections', 'Active connections (max)'], ['drops', 'Drops'],
];

function localInput(v) { return h('input', { type: 'datetime-local', value: v || '' }); }
function toUnix(s) { return Math.floor(new Date(s).getTime() / 1000); }

// A monitoring panel for `kind` (`service` or `endpoint`) `id`.
function monitoring(kind, id) {
  const period = h('select', { 'aria-label': 'period' }, [['realtime', 'Real time (last hour)'], ['24h', 'Last 24 hours'], ['7d', 'Last 7 days'], ['custom', 'Custom range']].map(([v, l]) => h('option', { value: v }, l)));
  const gran = h('select', { 'aria-label': 'granularity' }, [['', 'Granularity: auto'], ['1m', '1 minute'], ['1h', '1 hour'], ['1d', '1 day']].map(([v, l]) => h('option', { value: v }, l)));
  const metric = h('select', { 'aria-label': 'metric' }, METRICS.map(([v, l]) => h('option', { value: v }, l)));
  const from = localInput(); const to = localInput();
  const custom = h('span', { hidden: true }, ' from ', from, ' to ', to);
  const compare = h('input', { type: 'checkbox', 'aria-label': 'compare' });
  const compareFrom = localInput();
  const compareSpan = h('span', {}, h('label', {}, compare, ' Compare with a period starting '), compareFrom);
  const out = h('div', { class: 'chart' });
  const err = h('div', { class: 'formerr' });
  let last = null;
  function query(fmt) {
    let p = period.value;
    if (p === 'custom') p = `${toUnix(from.value)}..${toUnix(to.value)}`;
    let q = `period=${enc(p)}`;
    if (gran.value) q += `&granularity=${gran.value}`;
    if (compare.checked && compareFrom.value) q += `&compare_to=${toUnix(compareFrom.value)}`;
    if (fmt) q += `&format=${fmt}`;
    return q;
  }
  // Only the answer to the latest request is drawn (answers may come back out of order).
  let asked = 0;
  async function load() {
    const mine = ++asked;
    try {
      const v = await get(`/v1/history/${kind}/${enc(id)}?${query()}`);
      if (mine !== asked) return;
      err.textContent = '';
      last = v;
      draw();
    } catch (e) {
      if (mine !== asked) return;
      err.textContent = `${e.message}${e.code ? ' (' + e.code + ')' : ''}`;
      out.replaceChildren();
    }
  }
  function draw() {
    if (!last) return;
    const m = metric.value;
    out.replaceChildren(chart(last, m));
  }
  // Granularities the period allows: 1 min only within the last hour (10 s points are kept an
  // hour), 1 d only for periods of days.
  const allow = () => {
    const hour = period.value === 'realtime' || (period.value === 'custom' && from.value && Date.now() / 1000 - toUnix(from.value) < 3600);
    const long = period.value !== 'realtime';
    for (const o of gran.options) o.disabled = (o.value === '1m' && !hour) || (o.value === '1d' && !long);
    if (gran.selectedOptions[0] && gran.selectedOptions[0].disabled) gran.value = '';
  };
  period.addEventListener('change', () => { custom.hidden = period.value !== 'custom'; allow(); if (period.value !== 'custom') load(); });
  from.addEventListener('change', allow);
  allow();
  for (const el of [gran, compare, compareFrom, from, to]) el.addEventListener('change', load);
  metric.addEventListener('change', draw);
  const refresh = action('Refresh', load);
  const csv = action('Export CSV', () => download(`/v1/history/${kind}/${enc(id)}?${query('csv')}`, `${kind}-${id}-history.csv`));
  load();
  return h('section', { class: 'card monitoring' }, h('h2', {}, 'Monitoring'), h('div', { class: 'toolbar' }, period, custom, gran, metric, compareSpan, refresh, csv), err, out);
}

function fmtNum(n) {
  if (n >= 1e9) return (n / 1e9).toFixed(1) + 'G';
  if (n >= 1e6) return (n / 1e6).toFixed(1) + 'M';
  if (n >= 1e4) return (n / 1e3).toFixed(1) + 'k';
  return String(n);
}

function fmtTime(ts, step) {
  const d = new Date(ts * 1000);
  return step >= 86400 ? d.toISOString().slice(5, 10) : d.toISOString().slice(11, 16);
}

// A line chart of metric `m`: the period solid, the compared period dashed over the same x axis.
function chart(view, m) {
  const W = 900, H = 260, L = 60, R = 10, T = 10, B = 30;
  const now = view.points || [];
  const then = view.compare ? view.compare.points || [] : [];
  const step = view.granularity_secs;
  const n = Math.max(1, Math.round((view.to - view.from) / step));
  const max = Math.max(1, ...now.map((p) => p[m]), ...then.map((p) => p[m]));
  const x = (i) => L + (i / Math.max(1, n)) * (W - L - R);
  const y = (v) => T + (1 - v / max) * (H - T - B);
  const series = (pts, start, cls) => {
    const byIdx = new Map(pts.map((p) => [Math.round((p.ts - start) / step), p[m]]));
    const coords = [];
    for (let i = 0; i <= n; i++) coords.push(`${x(i).toFixed(1)},${y(byIdx.get(i) || 0).toFixed(1)}`);
    return h('polyline', { class: cls, points: coords.join(' ') });
  };
  const grid = [0, 0.25, 0.5, 0.75, 1].map((f) => [h('line', { class: 'grid', x1: L, x2: W - R, y1: y(max * f), y2: y(max * f) }), h('text', { x: L - 6, y: y(max * f) + 4, 'text-anchor': 'end' }, fmtNum(Math.round(max * f)))]);
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => h('text', { x: x(f * n), y: H - 10, 'text-anchor': 'middle' }, fmtTime(view.from + f * n * step, step)));
  const svg = h('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': `${m} over time` }, grid, ticks,
    h('line', { class: 'axis', x1: L, x2: L, y1: T, y2: H - B }), h('line', { class: 'axis', x1: L, x2: W - R, y1: H - B, y2: H - B }),
    view.compare ? series(then, view.compare.from, 'series-then') : null, series(now, view.from, 'series-now'));
  const total = (pts) => (m === 'max_active_connections' ? Math.max(0, ...pts.map((p) => p[m])) : pts.reduce((a, p) => a + p[m], 0));
  const label = m === 'max_active_connections' ? 'peak' : 'total';
  return h('div', {}, svg, h('div', { class: 'legend' },
    h('span', {}, h('span', { class: 'swatch-now' }), ` ${new Date(view.from * 1000).toISOString()} … ${label} `, h('b', { 'data-total': 'now' }, String(total(now)))),
    view.compare ? h('span', {}, h('span', { class: 'swatch-then' }), ` ${new Date(view.compare.from * 1000).toISOString()} … ${label} `, h('b', { 'data-total': 'then' }, String(total(then)))) : null,
    h('span', { class: 'muted' }, `every ${step >= 86400 ? step / 86400 + ' d' : step >= 3600 ? step / 3600 + ' h' : step >= 60 ? step / 60 + ' min' : step + ' s'}`)));
}

// ---- pages: provider --------------------------------------------------------------------------

const SERVICE_COLS = ['id', 'name', 'service_type', 'service_name', 'network_id', 'backends', 'port_mappings', 'auto_accept', 'proxy_protocol', 'private_dns_name', 'tags', 'owner', 'created_time'];

function servicesPage() {
  show(list({
    key: 'services', title: 'Endpoint services', path: '/v1/services', exportPath: '/v1/export/services.csv',
    exportable: ['id', 'service_name', 'name', 'private_dns_name', 'answer_ping', 'owner', 'network_id', 'service_type', 'backends', 'port_mappings', 'auto_accept', 'allowlist', 'tags', 'created_at'],
    columns: SERVICE_COLS, defaults: ['id', 'name', 'service_type', 'service_name', 'port_mappings', 'auto_accept', 'created_time'],
    link: (s) => `#/services/${enc(s.id)}`,
    filters: [{ key: 'service_type', label: 'Type', options: ['clb', 'mysql', 'redis', 'custom'] }, { key: 'auto_accept', label: 'Auto-accept', options: ['true', 'false'] }],
    toolbar: me.role === 'account' ? h('a', { href: '#/services/new' }, h('button', { class: 'primary', type: 'button' }, 'Create service')) : null,
  }));
}

async function networkOptions() {
  const nets = await get('/v1/networks');
  return (nets.items || nets).map((n) => [n.id, `${n.name} (${n.id})`]);
}

// Rows of port mappings: protocol, terminal port, service port.
function mappingRows(initial) {
  const box = h('div', { class: 'rows' });
  const add = (m) => {
    const proto = h('select', { 'aria-label': 'protocol' }, ['tcp', 'udp'].map((p) => h('option', { value: p }, p)));
    proto.value = (m && m.protocol) || 'tcp';
    const term = h('input', { type: 'number', min: 1, max: 65535, placeholder: 'terminal port', 'aria-label': 'terminal port', value: m ? m.terminal_port : '' });
    const svc = h('input', { type: 'number', min: 1, max: 65535, placeholder: 'service port', 'aria-label': 'service port', value: m ? m.service_port : '' });
    const row = h('div', { class: 'mapping' }, proto, term, svc, h('button', { type: 'button', onclick: () => row.remove() }, 'Remove'));
    box.append(row);
  };
  (initial && initial.length ? initial : [null]).forEach(add);
  const el = h('div', {}, box, h('button', { type: 'button', onclick: () => add(null) }, 'Add port mapping'));
  el.read = () => [...box.querySelectorAll('.mapping')].map((r) => {
    const [p, t, s] = r.querySelectorAll('select, input');
    return { protocol: p.value, terminal_port: +t.value, service_port: +s.value };
  }).filter((m) => m.terminal_port || m.service_port);
  return el;
}

async function newServicePage() {
  const nets = await networkOptions();
  const maps = mappingRows();
  show(h('h1', {}, 'Create endpoint service'), form({
    submitLabel: 'Create service',
    fields: [
      { name: 'name', label: 'Name' },
      { name: 'service_type', label: 'Type', type: 'select', options: [['custom', 'custom'], ['clb', 'clb'], ['mysql', 'mysql'], ['redis', 'redis']] },
      { name: 'network_id', label: 'Network', type: 'select', options: nets },
      { name: 'backends', label: 'Backends', placeholder: '198.18.2.10, 198.18.2.11', help: 'Backend addresses in the network, comma-separated' },
      { name: 'port_mappings', label: 'Port mappings', type: 'custom', element: maps, help: 'protocol, terminal port (what consumers dial), service port (on the backends)' },
      { name: 'tags', label: 'Tags', placeholder: 'team=db, env=prod', help: 'key=value, comma-separated' },
      { name: 'private_dns_name', label: 'Private DNS name', placeholder: 'db.example.internal' },
      { name: 'auto_accept', label: 'Accept connections automatically', type: 'checkbox' },
      { name: 'proxy_protocol', label: 'PROXY protocol', type: 'select', options: [['off', 'off'], ['v2', 'v2 (backends learn who is calling)']] },
      { name: 'connection_log', label: 'Connection log', type: 'checkbox' },
    ],
    submit: async (v) => {
      const body = { name: v.name, service_type: v.service_type, network_id: v.network_id, backends: words(v.backends), port_mappings: maps.read(), tags: parseTags(v.tags), auto_accept: v.auto_accept, proxy_protocol: v.proxy_protocol, connection_log: v.connection_log };
      if (v.private_dns_name) body.private_dns_name = v.private_dns_name;
      const s = await api('POST', '/v1/services', body);
      location.hash = `#/services/${enc(s.id)}`;
    },
  }));
}

async function servicePage(id) {
  const s = await get(`/v1/services/${enc(id)}`);
  const reload = () => servicePage(id);
  const patch = (body) => api('PATCH', `/v1/services/${enc(id)}`, body).then(reload);
  const maps = mappingRows();
  const allowOut = h('div');
  const connOut = h('div');
  const allowTable = h('table', {}, h('thead', {}, h('tr', {}, h('th', {}, ''), h('th', {}, 'account'), h('th', {}, 'description'), h('th', {}, 'added'))),
    h('tbody', {}, s.allowlist.length ? s.allowlist.map((a) => h('tr', { 'data-id': a.account_id }, h('td', {}, h('input', { type: 'checkbox', value: a.account_id, class: 'allow-pick', 'aria-label': 'select ' + a.account_id })), h('td', {}, a.account_id), h('td', {}, a.description), h('td', {}, a.created_time))) : h('tr', {}, h('td', { colspan: 4, class: 'muted' }, 'No account is allowed yet.'))));
  let conns = await get(`/v1/services/${enc(id)}/endpoints`);
  const stateFilter = h('select', { 'aria-label': 'connection state' }, h('option', { value: '' }, 'State: any'), ['Pending', 'Available', 'Rejected', 'Disconnected'].map((x) => h('option', { value: x }, x)));
  const connBody = h('tbody');
  const renderConns = () => {
    const rows = conns.filter((c) => !stateFilter.value || c.state === stateFilter.value);
    connBody.replaceChildren(...(rows.length ? rows.map((c) => h('tr', { 'data-id': c.endpoint_id }, h('td', {}, h('input', { type: 'checkbox', value: c.endpoint_id, class: 'conn-pick', 'aria-label': 'select ' + c.endpoint_id })), h('td', {}, c.endpoint_id), h('td', {}, c.owner), h('td', {}, cell('state', c.state)), h('td', {}, c.link_id), h('td', {}, c.created_time))) : [h('tr', {}, h('td', { colspan: 6, class: 'muted' }, 'No connections.'))]));
  };
  stateFilter.addEventListener('change', renderConns);
  renderConns();
  const picked = (cls) => [...document.querySelectorAll('.' + cls + ':checked')].map((c) => c.value);
  const decide = (verb) => action(verb[0].toUpperCase() + verb.slice(1) + ' selected', async () => {
    const res = await api('POST', `/v1/services/${enc(id)}/${verb}`, { endpoint_ids: picked('conn-pick') });
    results(connOut, res, 'endpoint_id');
    conns = await get(`/v1/services/${enc(id)}/endpoints`);
    renderConns();
  });
  show(
    h('p', {}, h('a', { href: '#/services' }, '‹ Endpoint services')),
    h('h1', {}, s.name, ' ', h('span', { class: 'muted' }, s.id)),
    h('section', { class: 'card' }, kv([
      ['Service name', s.service_name], ['Type', s.service_type], ['Network', s.network_id], ['Backends', s.backends.join(', ')],
      ['Port mappings', mappings(s.port_mappings)], ['Private DNS name', s.private_dns_name || '—'], ['Accept automatically', cell('auto_accept', s.auto_accept)],
      ['PROXY protocol', s.proxy_protocol], ['Connection log', cell('connection_log', s.connection_log)], ['Tags', tags(s.tags) || '—'], ['Created', s.created_time],
    ]), h('div', { class: 'toolbar' },
      action(s.auto_accept ? 'Turn auto-accept off' : 'Turn auto-accept on', () => patch({ auto_accept: !s.auto_accept })),
      action(s.proxy_protocol === 'v2' ? 'Turn PROXY protocol off' : 'Turn PROXY protocol v2 on', () => patch({ proxy_protocol: s.proxy_protocol === 'v2' ? 'off' : 'v2' })),
      action(s.connection_log ? 'Turn connection log off' : 'Turn connection log on', () => patch({ connection_log: !s.connection_log })),
      confirmAct('Delete service', `Delete ${s.name}?`, async () => { await api('DELETE', `/v1/services/${enc(id)}`); location.hash = '#/services'; }))),
    h('section', { class: 'card' }, h('h2', {}, 'Settings'), form({ submitLabel: 'Save', fields: [
      { name: 'name', label: 'Name', value: s.name },
      { name: 'tags', label: 'Tags', value: tags(s.tags), help: 'key=value, comma-separated' },
      { name: 'private_dns_name', label: 'Private DNS name', value: s.private_dns_name || '' },
    ], submit: (v) => patch({ name: v.name, tags: parseTags(v.tags), private_dns_name: v.private_dns_name || null }) }),
    h('h2', {}, 'Backends'), form({ submitLabel: 'Set backends', fields: [{ name: 'backends', label: 'Backends', value: s.backends.join(', ') }], submit: (v) => api('PUT', `/v1/services/${enc(id)}/backends`, { backends: words(v.backends) }).then(reload) }),
    h('h2', {}, 'Add port mappings'), form({ submitLabel: 'Add', fields: [{ name: 'port_mappings', label: 'Port mappings', type: 'custom', element: maps }], submit: () => api('POST', `/v1/services/${enc(id)}/port-mappings`, { port_mappings: maps.read() }).then(reload) })),
    h('section', { class: 'card' }, h('h2', {}, 'Allowlist'), allowTable, h('div', { class: 'toolbar' },
      action('Remove selected', async () => { const res = await api('POST', `/v1/services/${enc(id)}/disallow`, { account_ids: picked('allow-pick') }); results(allowOut, res, 'account_id'); setTimeout(reload, 600); }, 'danger')), allowOut,
    form({ submitLabel: 'Allow', fields: [
      { name: 'account_id', label: 'Accounts', placeholder: 'acme, globex', help: 'one or many account ids, comma-separated' },
      { name: 'description', label: 'Description' },
    ], submit: async (v) => {
      const ids = words(v.account_id);
      if (!ids.length) throw new ApiError(400, { error: { code: 'invalid_account', message: 'name at least one account', field: 'account_id' } });
      for (const a of ids) await api('POST', `/v1/services/${enc(id)}/allowlist`, { account_id: a, description: v.description });
      reload();
    } })),
    h('section', { class: 'card' }, h('h2', {}, 'Connections'), h('div', { class: 'toolbar' }, stateFilter, decide('accept'), decide('reject'), decide('remove')), connOut,
      h('table', { class: 'connections' }, h('thead', {}, h('tr', {}, h('th', {}, ''), h('th', {}, 'endpoint'), h('th', {}, 'account'), h('th', {}, 'state'), h('th', {}, 'link'), h('th', {}, 'created'))), connBody)),
    monitoring('service', id),
  );
}

// ---- pages: consumer --------------------------------------------------------------------------

function findPage() {
  const out = h('div');
  show(h('h1', {}, 'Find a service'), form({ submitLabel: 'Verify', fields: [{ name: 'service', label: 'Service name', placeholder: 'com.privatelink.local-1.svc-…', help: 'the service name its provider gave you (or its id)' }],
    submit: async (v) => {
      const s = await get(`/v1/services/${enc(v.service.trim())}/verify`);
      out.replaceChildren(h('section', { class: 'card verified' }, kv([['Service name', s.service_name], ['Name', s.name], ['Id', s.id], ['Type', s.service_type], ['Port mappings', mappings(s.port_mappings)], ['Private DNS name', s.private_dns_name || '—']]),
        h('p', {}, h('a', { href: `#/endpoints/new?service=${enc(s.service_name)}` }, h('button', { class: 'primary', type: 'button' }, 'Create an endpoint to it')))));
    } }), out);
}

const ENDPOINT_COLS = ['id', 'name', 'state', 'service_id', 'ip', 'ipv6', 'ip_address_type', 'dns_name', 'network_id', 'subnet_id', 'security_groups', 'private_dns_enabled', 'tags', 'owner', 'created_time'];

function endpointsPage() {
  show(list({
    key: 'endpoints', title: 'Endpoints', path: '/v1/endpoints', exportPath: '/v1/export/endpoints.csv',
    exportable: ['id', 'name', 'owner', 'network_id', 'subnet_id', 'ip', 'service_id', 'dns_name', 'private_dns_enabled', 'state', 'security_groups', 'tags', 'created_at'],
    columns: ENDPOINT_COLS, defaults: ['id', 'name', 'state', 'service_id', 'ip', 'dns_name', 'security_groups', 'created_time'],
    link: (e) => `#/endpoints/${enc(e.id)}`,
    filters: [{ key: 'state', label: 'State', options: ['Pending', 'Available', 'Rejected', 'Disconnected'] }, { key: 'ip_address_type', label: 'Addresses', options: ['ipv4', 'ipv6', 'dualstack'] }],
    toolbar: me.role === 'account' ? h('a', { href: '#/endpoints/new' }, h('button', { class: 'primary', type: 'button' }, 'Create endpoint')) : null,
  }));
}

// Security groups chosen in order: the first has the highest priority (1).
function groupPicker(all, chosen) {
  const order = chosen.slice();
  const box = h('div', { class: 'rows' });
  const render = () => {
    box.replaceChildren(...order.map((gid, i) => h('div', { class: 'picked', 'data-id': gid }, h('span', {}, `${i + 1}. ${(all.find((g) => g.id === gid) || {}).name || ''} (${gid})`),
      h('button', { type: 'button', disabled: i === 0, 'aria-label': 'move up ' + gid, onclick: () => { [order[i - 1], order[i]] = [order[i], order[i - 1]]; render(); } }, '↑'),
      h('button', { type: 'button', disabled: i === order.length - 1, 'aria-label': 'move down ' + gid, onclick: () => { [order[i + 1], order[i]] = [order[i], order[i + 1]]; render(); } }, '↓'),
      h('button', { type: 'button', onclick: () => { order.splice(i, 1); render(); } }, 'Remove'))));
    pick.replaceChildren(h('option', { value: '' }, 'Add a security group…'), ...all.filter((g) => !order.includes(g.id)).map((g) => h('option', { value: g.id }, `${g.name} (${g.id})`)));
  };
  const pick = h('select', { 'aria-label': 'add security group' });
  pick.addEventListener('change', () => { if (pick.value) { order.push(pick.value); render(); } });
  render();
  const el = h('div', {}, box, pick);
  el.read = () => order.map((g, i) => ({ security_group_id: g, priority: i + 1 }));
  return el;
}

async function allGroups() { const g = await get('/v1/security-groups?per_page=1000'); return g.items || g; }

async function newEndpointPage(params) {
  const nets = await networkOptions();
  const groups = await allGroups();
  const picker = groupPicker(groups, []);
  const subnet = h('select', { name: 'subnet_id' });
  const loadSubnets = async (net) => {
    subnet.replaceChildren();
    if (!net) return;
    const subs = await get(`/v1/networks/${enc(net)}/subnets`);
    subnet.replaceChildren(...(subs.items || subs).map((s) => h('option', { value: s.id }, `${s.name} ${s.cidr}${s.ipv6_cidr ? ' ' + s.ipv6_cidr : ''} (${s.id})`)));
  };
  const f = form({ submitLabel: 'Create endpoint', fields: [
    { name: 'name', label: 'Name' },
    { name: 'service_id', label: 'Service', value: params.get('service') || '', help: 'service name or id' },
    { name: 'network_id', label: 'Network', type: 'select', options: nets },
    { name: 'subnet_id', label: 'Subnet', type: 'custom', element: subnet },
    { name: 'ip_address_type', label: 'Addresses', type: 'select', options: [['ipv4', 'IPv4'], ['ipv6', 'IPv6'], ['dualstack', 'Dual-stack']] },
    { name: 'ip', label: 'IPv4 address', placeholder: 'automatic', help: 'leave empty to have one chosen in the subnet' },
    { name: 'ipv6', label: 'IPv6 address', placeholder: 'automatic' },
    { name: 'security_groups', label: 'Security groups', type: 'custom', element: picker, help: 'evaluated in this order' },
    { name: 'private_dns_enabled', label: 'Private DNS', type: 'checkbox' },
    { name: 'tags', label: 'Tags', help: 'key=value, comma-separated' },
  ], submit: async (v) => {
    const body = { name: v.name, service_id: v.service_id.trim(), network_id: v.network_id, subnet_id: subnet.value, ip_address_type: v.ip_address_type, security_groups: picker.read(), private_dns_enabled: v.private_dns_enabled, tags: parseTags(v.tags) };
    if (v.ip.trim()) body.ip = v.ip.trim();
    if (v.ipv6.trim()) body.ipv6 = v.ipv6.trim();
    const e = await api('POST', '/v1/endpoints', body);
    location.hash = `#/endpoints/${enc(e.id)}`;
  } });
  const netSel = f.querySelector('select[name=network_id]');
  netSel.addEventListener('change', () => loadSubnets(netSel.value));
  await loadSubnets(netSel.value);
  show(h('h1', {}, 'Create endpoint'), f);
}

async function endpointPage(id) {
  const e = await get(`/v1/endpoints/${enc(id)}`);
  const reload = () => endpointPage(id);
  const groups = me.role === 'account' ? await allGroups() : [];
  const picker = groupPicker(groups, e.security_groups.slice().sort((a, b) => a.priority - b.priority).map((b) => b.security_group_id));
  show(
    h('p', {}, h('a', { href: '#/endpoints' }, '‹ Endpoints')),
    h('h1', {}, e.name, ' ', h('span', { class: 'muted' }, e.id)),
    h('section', { class: 'card' }, kv([
      ['State', cell('state', e.state)], ['Service', e.service_id], ['Addresses', [e.ip, e.ipv6].filter(Boolean).join(', ')], ['Type', e.ip_address_type],
      ['DNS name', e.dns_name], ['Network', e.network_id], ['Subnet', e.subnet_id], ['Security groups', bindings(e.security_groups) || '—'],
      ['Private DNS', cell('private_dns_enabled', e.private_dns_enabled)], ['Tags', tags(e.tags) || '—'], ['Created', e.created_time],
    ]), h('div', { class: 'toolbar' }, action(e.private_dns_enabled ? 'Turn private DNS off' : 'Turn private DNS on', () => api('PATCH', `/v1/endpoints/${enc(id)}`, { private_dns_enabled: !e.private_dns_enabled }).then(reload)),
      confirmAct('Delete endpoint', `Delete ${e.name}?`, async () => { await api('DELETE', `/v1/endpoints/${enc(id)}`); location.hash = '#/endpoints'; }))),
    h('section', { class: 'card' }, h('h2', {}, 'Settings'), form({ submitLabel: 'Save', fields: [
      { name: 'name', label: 'Name', value: e.name },
      { name: 'tags', label: 'Tags', value: tags(e.tags) },
    ], submit: (v) => api('PATCH', `/v1/endpoints/${enc(id)}`, { name: v.name, tags: parseTags(v.tags) }).then(reload) })),
    h('section', { class: 'card' }, h('h2', {}, 'Security groups (in priority order)'), form({ submitLabel: 'Save order', fields: [{ name: 'security_groups', label: 'Groups', type: 'custom', element: picker }],
      submit: () => api('PUT', `/v1/endpoints/${enc(id)}/security-groups`, { security_groups: picker.read() }).then(reload) })),
    monitoring('endpoint', id),
  );
}

function groupsPage() {
  show(list({
    key: 'groups', title: 'Security groups', path: '/v1/security-groups', columns: ['id', 'name', 'rules', 'tags', 'owner', 'created_time'], defaults: ['id', 'name', 'rules', 'tags', 'created_time'],
    link: (g) => `#/security-groups/${enc(g.id)}`,
    toolbar: me.role === 'account' ? h('a', { href: '#/security-groups/new' }, h('button', { class: 'primary', type: 'button' }, 'Create security group')) : null,
  }));
}

// Ordered rule rows: protocol, ports, source, action, description.
function ruleRows(initial) {
  const box = h('div', { class: 'rows' });
  const add = (r) => {
    const proto = h('select', { 'aria-label': 'rule protocol' }, ['tcp', 'udp', 'icmp', 'all'].map((p) => h('option', { value: p }, p)));
    proto.value = (r && r.protocol) || 'tcp';
    const ports = h('input', { placeholder: 'all, 80 or 80-90', 'aria-label': 'ports', value: r ? r.ports : 'all' });
    const source = h('input', { placeholder: '10.0.0.0/8', 'aria-label': 'source', value: r ? r.source : '' });
    const act = h('select', { 'aria-label': 'action' }, ['accept', 'drop'].map((p) => h('option', { value: p }, p)));
    act.value = (r && r.action) || 'accept';
    const desc = h('input', { placeholder: 'description', 'aria-label': 'description', value: r ? r.description : '' });
    const row = h('div', { class: 'rule' }, proto, ports, source, act, desc,
      h('button', { type: 'button', 'aria-label': 'move up', onclick: () => { if (row.previousSibling) box.insertBefore(row, row.previousSibling); } }, '↑'),
      h('button', { type: 'button', onclick: () => row.remove() }, 'Remove'));
    box.append(row);
  };
  (initial || []).forEach(add);
  const el = h('div', {}, box, h('button', { type: 'button', onclick: () => add(null) }, 'Add rule'));
  el.read = () => [...box.querySelectorAll('.rule')].map((row) => {
    const [p, ports, src, a, d] = row.querySelectorAll('select, input');
    const rule = { protocol: p.value, source: src.value.trim(), action: a.value, ports: ports.value.trim() || 'all' };
    if (d.value.trim()) rule.description = d.value.trim();
    return rule;
  });
  return el;
}

function newGroupPage() {
  const rules = ruleRows([{ protocol: 'tcp', ports: 'all', source: '', action: 'accept', description: '' }]);
  show(h('h1', {}, 'Create security group'), form({ submitLabel: 'Create', fields: [
    { name: 'name', label: 'Name' },
    { name: 'rules', label: 'Rules (in order)', type: 'custom', element: rules },
    { name: 'tags', label: 'Tags', help: 'key=value, comma-separated' },
  ], submit: async (v) => {
    const g = await api('POST', '/v1/security-groups', { name: v.name, rules: rules.read(), tags: parseTags(v.tags) });
    location.hash = `#/security-groups/${enc(g.id)}`;
  } }));
}

async function groupPage(id) {
  const g = await get(`/v1/security-groups/${enc(id)}`);
  const reload = () => groupPage(id);
  const rules = ruleRows(g.rules);
  show(h('p', {}, h('a', { href: '#/security-groups' }, '‹ Security groups')), h('h1', {}, g.name, ' ', h('span', { class: 'muted' }, g.id)),
    h('section', { class: 'card' }, form({ submitLabel: 'Save', fields: [{ name: 'name', label: 'Name', value: g.name }, { name: 'tags', label: 'Tags', value: tags(g.tags) }],
      submit: (v) => api('PATCH', `/v1/security-groups/${enc(id)}`, { name: v.name, tags: parseTags(v.tags) }).then(reload) }),
    h('div', { class: 'toolbar' }, confirmAct('Delete security group', `Delete ${g.name}?`, async () => { await api('DELETE', `/v1/security-groups/${enc(id)}`); location.hash = '#/security-groups'; }))),
    h('section', { class: 'card' }, h('h2', {}, 'Rules (first match wins)'), form({ submitLabel: 'Save rules', fields: [{ name: 'rules', label: 'Rules', type: 'custom', element: rules }],
      submit: () => api('PUT', `/v1/security-groups/${enc(id)}/rules`, { rules: rules.read() }).then(reload) })));
}

// ---- pages: admin ------------------------------------------------------------------------------

async function accountsPage() {
  const accts = await get('/v1/accounts');
  const out = h('div');
  const rows = (accts.items || accts);
  show(h('h1', {}, 'Accounts'), out,
    h('table', { class: 'list' }, h('thead', {}, h('tr', {}, ['id', 'name', 'number', 'created_time', ''].map((c) => h('th', {}, c)))),
      h('tbody', {}, rows.length ? rows.map((a) => h('tr', { 'data-id': a.id }, h('td', {}, h('a', { href: `#/accounts/${enc(a.id)}` }, a.id)), h('td', {}, a.name), h('td', {}, a.number), h('td', {}, a.created_time), h('td', {}))) : h('tr', {}, h('td', { colspan: 5, class: 'muted' }, 'No accounts yet.')))),
    h('h2', {}, 'Create account'), form({ submitLabel: 'Create account', fields: [{ name: 'id', label: 'Account id', placeholder: 'acme' }, { name: 'name', label: 'Name' }],
      submit: async (v) => {
        const r = await api('POST', '/v1/accounts', { id: v.id, name: v.name });
        await accountsPage();
        main().prepend(h('div', { class: 'notice' }, `Account ${r.account.id} created. Its token (shown once): `, h('code', { class: 'token' }, r.token)));
      } }));
}

async function accountPage(id) {
  const tokens = await get(`/v1/accounts/${enc(id)}/tokens`);
  const shown = h('div');
  const reload = async (note) => { await accountPage(id); if (note) main().prepend(note); };
  const once = (t) => h('div', { class: 'notice' }, 'New token (shown once): ', h('code', { class: 'token' }, t));
  show(h('p', {}, h('a', { href: '#/accounts' }, '‹ Accounts')), h('h1', {}, 'Account ', id), shown,
    h('table', { class: 'list' }, h('thead', {}, h('tr', {}, ['token id', 'created', 'expires', ''].map((c) => h('th', {}, c)))),
      h('tbody', {}, (tokens.items || tokens).map((t) => h('tr', { 'data-id': t.id }, h('td', {}, t.id), h('td', {}, t.created_time), h('td', {}, t.expires_time || 'never'),
        h('td', {}, confirmAct('Revoke', `Revoke ${t.id}?`, () => api('DELETE', `/v1/accounts/${enc(id)}/tokens/${enc(t.id)}`).then(() => reload()))))))),
    h('div', { class: 'toolbar' },
      action('Issue another token', async () => { const r = await api('POST', `/v1/accounts/${enc(id)}/tokens`); await reload(once(r.token)); }),
      action('Rotate (old tokens stop now)', async () => { const r = await api('POST', `/v1/accounts/${enc(id)}/tokens/rotate`, { grace_secs: 0 }); await reload(once(r.token)); }),
      confirmAct('Delete account', `Delete account ${id}?`, async () => { await api('DELETE', `/v1/accounts/${enc(id)}`); location.hash = '#/accounts'; })));
}

async function networksPage() {
  const nets = await get('/v1/networks');
  const rows = nets.items || nets;
  show(h('h1', {}, 'Networks'),
    h('table', { class: 'list' }, h('thead', {}, h('tr', {}, ['id', 'name', 'owner', 'cidrs', 'created_time'].map((c) => h('th', {}, c)))),
      h('tbody', {}, rows.length ? rows.map((n) => h('tr', { 'data-id': n.id }, h('td', {}, h('a', { href: `#/networks/${enc(n.id)}` }, n.id)), h('td', {}, n.name), h('td', {}, n.owner), h('td', {}, n.cidrs.join(', ')), h('td', {}, n.created_time))) : h('tr', {}, h('td', { colspan: 5, class: 'muted' }, 'No networks yet.')))),
    me.role === 'admin' ? [h('h2', {}, 'Create network'), form({ submitLabel: 'Create network', fields: [{ name: 'name', label: 'Name' }, { name: 'owner', label: 'Owner account' }, { name: 'cidrs', label: 'CIDRs', placeholder: '10.0.0.0/16, fd00::/48' }],
      submit: async (v) => { const n = await api('POST', '/v1/networks', { name: v.name, owner: v.owner, cidrs: words(v.cidrs) }); location.hash = `#/networks/${enc(n.id)}`; } })] : null);
}

async function networkPage(id) {
  const n = await get(`/v1/networks/${enc(id)}`);
  const subs = await get(`/v1/networks/${enc(id)}/subnets`);
  const reload = () => networkPage(id);
  show(h('p', {}, h('a', { href: '#/networks' }, '‹ Networks')), h('h1', {}, n.name, ' ', h('span', { class: 'muted' }, n.id)),
    h('section', { class: 'card' }, kv([['Owner', n.owner], ['CIDRs', n.cidrs.join(', ')], ['Created', n.created_time]]),
      me.role === 'admin' ? h('div', { class: 'toolbar' }, confirmAct('Delete network', `Delete ${n.name}?`, async () => { await api('DELETE', `/v1/networks/${enc(id)}`); location.hash = '#/networks'; })) : null),
    h('h2', {}, 'Subnets'),
    h('table', { class: 'list' }, h('thead', {}, h('tr', {}, ['id', 'name', 'cidr', 'ipv6_cidr', ''].map((c) => h('th', {}, c)))),
      h('tbody', {}, (subs.items || subs).map((s) => h('tr', { 'data-id': s.id }, h('td', {}, s.id), h('td', {}, s.name), h('td', {}, s.cidr), h('td', {}, s.ipv6_cidr || ''),
        h('td', {}, me.role === 'admin' ? confirmAct('Delete', `Delete subnet ${s.name}?`, () => api('DELETE', `/v1/networks/${enc(id)}/subnets/${enc(s.id)}`).then(reload)) : null))))),
    me.role === 'admin' ? [h('h2', {}, 'Create subnet'), form({ submitLabel: 'Create subnet', fields: [{ name: 'name', label: 'Name' }, { name: 'cidr', label: 'IPv4 CIDR' }, { name: 'ipv6_cidr', label: 'IPv6 CIDR', placeholder: 'optional' }],
      submit: async (v) => { const b = { name: v.name, cidr: v.cidr }; if (v.ipv6_cidr) b.ipv6_cidr = v.ipv6_cidr; await api('POST', `/v1/networks/${enc(id)}/subnets`, b); reload(); } })] : null);
}

async function nodesPage() {
  const r = await get('/v1/nodes');
  const cols = ['node', 'status', 'revision', 'lag', 'last_contact', 'reported_time', 'ha'];
  show(h('h1', {}, 'Nodes'), h('p', { class: 'muted' }, 'Each node reports the state revision it has applied; lag is how many revisions it is behind.'),
    h('table', { class: 'list' }, h('thead', {}, h('tr', {}, cols.map((c) => h('th', {}, c)))),
      h('tbody', {}, r.nodes.length ? r.nodes.map((n) => h('tr', { 'data-id': n.node }, cols.map((c) => h('td', { 'data-col': c }, c === 'last_contact' ? `${Math.max(0, Math.round(Date.now() / 1000) - n.last_contact)} s ago` : cell(c, n[c]))))) : h('tr', {}, h('td', { colspan: cols.length, class: 'muted' }, 'No node has reported (an embedded store has only this node).')))));
}

// ---- sign-in and routing ----------------------------------------------------------------------

function signIn(message) {
  document.getElementById('nav').replaceChildren();
  document.getElementById('who').replaceChildren();
  const f = form({ submitLabel: 'Sign in', fields: [{ name: 'token', label: 'Account token', type: 'password', help: 'an account token, or the admin token' }],
    submit: async (v) => {
      me = await api('POST', '/console/session', { token: v.token });
      if (!location.hash || location.hash === '#/') location.hash = me.role === 'admin' ? '#/accounts' : '#/services';
      route();
    } });
  show(h('div', { class: 'signin card' }, h('h1', {}, 'Sign in to privatelink'), message ? h('p', { class: 'formerr' }, message) : null, f));
}

async function signOut() {
  try { await api('DELETE', '/console/session'); } catch (e) { /* the session is gone either way */ }
  me = null;
  location.hash = '#/';
  signIn();
}

function navigation(current) {
  const items = me.role === 'admin'
    ? [['accounts', 'Accounts'], ['networks', 'Networks'], ['nodes', 'Nodes'], ['services', 'Services'], ['endpoints', 'Endpoints'], ['security-groups', 'Security groups']]
    : [['services', 'Endpoint services'], ['find', 'Find a service'], ['endpoints', 'Endpoints'], ['security-groups', 'Security groups'], ['networks', 'Networks']];
  document.getElementById('nav').replaceChildren(...items.map(([k, l]) => h('a', { href: `#/${k}`, class: current === k ? 'on' : '' }, l)));
  document.getElementById('who').replaceChildren(me.role === 'admin' ? 'admin' : `${me.name || ''} (${me.account_id})`, h('button', { type: 'button', onclick: signOut }, 'Sign out'));
}

// Marks the page rendered for the current address (what tests and scripts can wait for).
async function route() {
  document.body.dataset.route = '';
  await render();
  document.body.dataset.route = location.hash || '#/';
}

async function render() {
  if (!me) return signIn();
  const [path, qs] = (location.hash.slice(1) || '/').split('?');
  const params = new URLSearchParams(qs || '');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  const [section, id] = parts;
  navigation(section);
  try {
    switch (section) {
      case 'services': return id === 'new' ? await newServicePage() : id ? await servicePage(id) : servicesPage();
      case 'find': return findPage();
      case 'endpoints': return id === 'new' ? await newEndpointPage(params) : id ? await endpointPage(id) : endpointsPage();
      case 'security-groups': return id === 'new' ? newGroupPage() : id ? await groupPage(id) : groupsPage();
      case 'accounts': return id ? await accountPage(id) : await accountsPage();
      case 'networks': return id ? await networkPage(id) : await networksPage();
      case 'nodes': return await nodesPage();
      default: location.hash = me.role === 'admin' ? '#/accounts' : '#/services';
    }
  } catch (e) {
    if (me) show(h('h1', {}, 'Something went wrong'), h('p', { class: 'formerr' }, `${e.message}${e.code ? ' (' + e.code + ')' : ''}`));
  }
}

window.addEventListener('hashchange', route);
window.addEventListener('DOMContentLoaded', async () => {
  try { me = await api('GET', '/console/session'); } catch (e) { me = null; }
  route();
});
