// The Millwright fleet dashboard. Everything comes from the server's JSON API (/api/v1, see
// /api/v1/openapi.json) with the signed-in user's bearer token; charts are SVG built here.
'use strict';

const TOKEN_KEY = 'millwright-token';
const REFRESH_MS = 3000;
const ROLES = { viewer: 1, operator: 2, admin: 3 };
const session = { token: sessionStorage.getItem(TOKEN_KEY), user: null };
const ui = { notice: '', error: '', drift: { model: '', release: '', cell: null, bucket: 60 },
  openOnly: false, busy: false };

// ---------- small helpers ----------

/**
 * An element with attributes and children (text or nodes). `on*` functions are kept as data on
 * the element (`el.on`) and called by one listener per event type on the document, so that a
 * redraw can move them onto the element already on screen (see `morph`).
 */
function h(tag, attrs, ...children) {
  const svg = ['svg', 'polyline', 'line', 'text', 'rect', 'circle', 'g', 'title'].includes(tag);
  const el = svg ? document.createElementNS('http://www.w3.org/2000/svg', tag)
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') (el.on = el.on || {})[k.slice(2)] = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// Capturing, so that events which do not bubble reach their element's function too.
for (const type of ['click', 'change', 'submit']) {
  document.addEventListener(type, e => {
    for (let el = e.target; el && el !== document; el = el.parentNode) {
      if (el.on && el.on[type]) { el.on[type](e); return; }
    }
  }, true);
}

/**
 * Makes the children of `old` (on screen) look like those of `next` (just drawn), keeping every
 * element whose tag and id are unchanged: a refresh changes texts and attributes in place, so a
 * click, a focus or what is being typed survives it.
 */
function morph(old, next) {
  const before = [...old.childNodes], after = [...next.childNodes];
  after.forEach((n, i) => {
    const o = before[i];
    if (!o) old.append(n);
    else if (o.nodeType === Node.TEXT_NODE && n.nodeType === Node.TEXT_NODE) {
      if (o.data !== n.data) o.data = n.data;
    } else if (o.nodeType === Node.ELEMENT_NODE && o.nodeName === n.nodeName && o.id === n.id) {
      for (const a of [...o.attributes]) if (!n.hasAttribute(a.name)) o.removeAttribute(a.name);
      for (const a of n.attributes) if (o.getAttribute(a.name) !== a.value) o.setAttribute(a.name, a.value);
      o.on = n.on;
      morph(o, n);
    } else old.replaceChild(n, o);
  });
  for (const o of before.slice(after.length)) o.remove();
}

function badge(text, kind) { return h('span', { class: 'badge ' + (kind || text) }, text); }

function ago(ms) {
  if (!ms) return '—';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 90) return s + ' s ago';
  if (s < 5400) return Math.round(s / 60) + ' min ago';
  if (s < 172800) return Math.round(s / 3600) + ' h ago';
  return Math.round(s / 86400) + ' d ago';
}

function when(ms) { return ms ? new Date(ms).toISOString().replace('T', ' ').slice(0, 19) + 'Z' : '—'; }

function num(x, digits) { return x === null || x === undefined ? '—' : Number(x).toFixed(digits); }

function can(role) { return session.user && ROLES[session.user.role] >= ROLES[role]; }

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

/** Calls the API with the session's token; throws ApiError with the server's reason. */
async function api(path, options) {
  const opts = Object.assign({ headers: {} }, options || {});
  if (session.token) opts.headers.Authorization = 'Bearer ' + session.token;
  if (opts.json !== undefined) {
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(opts.json);
    delete opts.json;
  }
  const res = await fetch(path, opts);
  const text = await res.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = { error: text }; }
  if (!res.ok) {
    if (res.status === 401 && session.user) signOut('Your session ended: sign in again.');
    throw new ApiError(res.status, (body && body.error) || res.statusText);
  }
  return body;
}

// ---------- charts ----------

/** A line chart of `points` ([x, y]) with optional horizontal `marks` ({y, label, color}). */
function lineChart(points, opts) {
  const W = 720, H = 220, L = 48, R = 12, T = 12, B = 30;
  const svg = h('svg', { class: 'chart', viewBox: `0 0 ${W} ${H}`, role: 'img',
    'aria-label': opts.label, 'data-points': points.length });
  if (!points.length) {
    svg.append(h('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle', fill: '#616e7c' }, 'no data yet'));
    return svg;
  }
  const xs = points.map(p => p[0]), ys = points.map(p => p[1]);
  const marks = opts.marks || [];
  let y0 = Math.min(...ys, ...marks.map(m => m.y)), y1 = Math.max(...ys, ...marks.map(m => m.y));
  if (y0 === y1) { y0 -= 1; y1 += 1; }
  const x0 = Math.min(...xs), x1 = Math.max(...xs) === x0 ? x0 + 1 : Math.max(...xs);
  const px = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const py = y => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  svg.append(h('line', { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: '#d9e2ec' }));
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    svg.append(h('text', { x: L - 6, y: py(y) + 4, 'text-anchor': 'end', 'font-size': 11, fill: '#616e7c' },
      num(y, Math.abs(y1 - y0) < 5 ? 2 : 0)));
  }
  marks.forEach((m, i) => {
    svg.append(h('line', { x1: L, x2: W - R, y1: py(m.y), y2: py(m.y), stroke: m.color,
      'stroke-dasharray': '5 4' }));
    // Labels alternate ends, so that close thresholds stay readable.
    const [x, anchor] = i % 2 ? [W - R - 2, 'end'] : [L + 4, 'start'];
    svg.append(h('text', { x, y: py(m.y) - 3, 'text-anchor': anchor, 'font-size': 11, fill: m.color }, m.label));
  });
  svg.append(h('text', { x: L, y: H - 8, 'font-size': 11, fill: '#616e7c' }, opts.xFormat(x0)));
  svg.append(h('text', { x: W - R, y: H - 8, 'text-anchor': 'end', 'font-size': 11, fill: '#616e7c' }, opts.xFormat(x1)));
  svg.append(h('polyline', { fill: 'none', stroke: '#2b6cb0', 'stroke-width': 2,
    points: points.map(p => px(p[0]).toFixed(1) + ',' + py(p[1]).toFixed(1)).join(' ') }));
  const last = points[points.length - 1];
  svg.append(h('circle', { cx: px(last[0]), cy: py(last[1]), r: 3.5, fill: '#2b6cb0' }));
  return svg;
}

// ---------- views ----------

async function viewFleet() {
  const devices = await api('/api/v1/devices');
  const online = devices.filter(d => d.online).length;
  const open = devices.reduce((n, d) => n + d.open_alerts, 0);
  const bySite = new Map();
  for (const d of devices) {
    const site = d.site || '(no site)';
    if (!bySite.has(site)) bySite.set(site, []);
    bySite.get(site).push(d);
  }
  const out = [h('h1', {}, 'Fleet'),
    h('div', { class: 'cards' },
      h('div', { class: 'stat' }, h('b', { id: 'stat-devices' }, devices.length), h('span', {}, 'devices')),
      h('div', { class: 'stat' }, h('b', { id: 'stat-online' }, online), h('span', {}, 'online')),
      h('div', { class: 'stat' }, h('b', { id: 'stat-sites' }, bySite.size), h('span', {}, 'sites')),
      h('div', { class: 'stat' }, h('b', { id: 'stat-open-alerts' }, open), h('span', {}, 'open alerts')))];
  if (!devices.length) out.push(h('p', { class: 'muted' }, 'No device has reported yet.'));
  for (const [site, list] of [...bySite.entries()].sort()) {
    out.push(h('h2', {}, site + ' · ' + list.length + ' device(s)'));
    out.push(h('div', { class: 'scroll' }, h('table', { class: 'fleet', 'data-site': site },
      h('tr', {}, ['Device', 'State', 'Model release', 'Backlog', 'Last seen', 'Open alerts', 'Predictions', 'Agent']
        .map(t => h('th', {}, t))),
      list.map(d => h('tr', { 'data-device': d.device },
        h('td', {}, h('a', { href: '#/device/' + encodeURIComponent(d.device) }, d.device)),
        h('td', {}, d.online ? badge('online') : badge('offline')),
        h('td', { class: 'release' }, d.models.length
          ? d.models.map(m => m.model + ' r' + m.release).join(', ') : '—'),
        h('td', { class: 'backlog' }, d.backlog_records === null ? '—'
          : d.backlog_records + (d.backlog_oldest_ms ? ' (oldest ' + ago(d.backlog_oldest_ms) + ')' : ''),
          d.dropped ? h('span', { class: 'dropped muted', title: 'dropped by policy (outbox quota), announced in gap records' },
            ' · ' + d.dropped + ' dropped') : ''),
        h('td', {}, ago(d.last_seen_ms)),
        h('td', { class: 'open-alerts' }, d.open_alerts ? badge(String(d.open_alerts), 'alarm') : '0'),
        h('td', { class: 'predictions' }, d.predictions),
        h('td', {}, d.agent_version || '—'))))));
  }
  return out;
}

async function viewDevice(id) {
  const enc = encodeURIComponent(id);
  const [device, latest, predictions, alerts, updates] = await Promise.all([
    api('/api/v1/devices/' + enc), api('/api/v1/devices/' + enc + '/latest'),
    api('/api/v1/devices/' + enc + '/predictions?limit=10000&newest=true'),
    api('/api/v1/devices/' + enc + '/alerts?limit=10000&newest=true'), api('/api/v1/devices/' + enc + '/updates')]);
  const out = [h('h1', {}, h('span', { id: 'device' }, device.device), ' ',
      device.online ? badge('online') : badge('offline')),
    h('div', { class: 'card' }, h('div', { class: 'row' },
      h('span', {}, 'Site: ', h('b', {}, device.site || '—')),
      h('span', {}, 'Class: ', h('b', {}, device.device_class || '—')),
      h('span', {}, 'Tags: ', h('b', {}, device.tags.join(', ') || '—')),
      h('span', {}, 'Agent: ', h('b', {}, device.agent_version || '—')),
      h('span', {}, 'Models: ', h('b', { class: 'release' },
        device.models.map(m => m.model + ' r' + m.release).join(', ') || '—')),
      h('span', {}, 'Backlog: ', h('b', {}, device.backlog_records === null ? '—' : device.backlog_records)),
      h('span', {}, 'Dropped by policy: ', h('b', { class: 'dropped' }, device.dropped)),
      h('span', {}, 'Last seen: ', h('b', {}, ago(device.last_seen_ms))),
      h('span', {}, 'First seen: ', h('b', {}, when(device.first_seen_ms)))))];
  out.push(h('h2', {}, 'Assets'));
  out.push(h('div', { class: 'assets' }, latest.map(a => {
    const series = predictions.filter(p => p.asset === a.asset).map(p => [p.cycle, p.value]);
    const p = a.prediction;
    return h('div', { class: 'card asset', 'data-asset': a.asset, 'data-level': a.level },
      h('div', { class: 'row' }, h('b', {}, a.asset), badge(a.level)),
      p ? h('p', {}, h('span', { class: 'value', 'data-value': p.value }, num(p.value, 1)),
        ' predicted at cycle ', p.cycle, ' by ', p.model, ' r', p.release, ' · ', ago(p.at_ms))
        : h('p', { class: 'muted' }, 'no prediction yet'),
      lineChart(series, { label: 'prediction trend of ' + a.asset, xFormat: x => 'cycle ' + x }));
  })));
  out.push(h('h2', {}, 'Alerts'));
  out.push(alerts.length ? h('div', { class: 'scroll' }, h('table', {},
    h('tr', {}, ['Time', 'Asset', 'Change', 'Value', 'Cycle'].map(t => h('th', {}, t))),
    alerts.slice().reverse().map(a => h('tr', {}, h('td', {}, when(a.at_ms)), h('td', {}, a.asset),
      h('td', {}, badge(a.from), ' → ', badge(a.to)), h('td', {}, num(a.value, 1)), h('td', {}, a.cycle)))))
    : h('p', { class: 'muted' }, 'No alerts.'));
  out.push(h('h2', {}, 'Model updates'));
  out.push(updates.length ? h('div', { class: 'scroll' }, h('table', { id: 'updates' },
    h('tr', {}, ['Time', 'Rollout', 'Release', 'Phase', 'Reason'].map(t => h('th', {}, t))),
    updates.slice().reverse().map(u => h('tr', {}, h('td', {}, when(u.at_ms)), h('td', {}, u.rollout || '—'),
      h('td', {}, u.release === null ? '—' : u.release), h('td', {}, badge(u.phase, 'pending')),
      h('td', {}, u.reason || '')))))
    : h('p', { class: 'muted' }, 'No update reports.'));
  return out;
}

const ROLLOUT_ACTIONS = {
  pause: ['running'], resume: ['paused'], abort: ['running', 'paused'],
  revert: ['running', 'paused', 'completed', 'aborted'],
};

async function act(rollout, action) {
  const input = document.getElementById('reason-' + rollout);
  const reason = (input && input.value.trim()) || action + ' from the dashboard';
  ui.busy = true;
  try {
    const r = await api('/api/v1/rollouts/' + encodeURIComponent(rollout) + '/' + action,
      { method: 'POST', json: { reason } });
    ui.notice = 'Rollout ' + rollout + ': ' + action + ' done, now ' + r.state + '.';
    ui.error = '';
    if (input) input.value = '';
  } catch (e) {
    ui.error = 'Rollout ' + rollout + ': ' + action + ' refused: ' + e.message;
  } finally {
    ui.busy = false;
  }
  render();
}

async function viewRollouts() {
  const rollouts = await api('/api/v1/rollouts');
  const out = [h('h1', {}, 'Rollouts')];
  if (!rollouts.length) out.push(h('p', { class: 'muted' }, 'No rollouts yet. Start one with `millwright rollout start`.'));
  for (const r of rollouts.slice().reverse()) {
    const count = s => r.devices.filter(d => d.state === s).length;
    const done = count('committed');
    const bar = h('div', {});
    bar.style.width = (r.devices.length ? 100 * done / r.devices.length : 0).toFixed(0) + '%';
    const buttons = Object.entries(ROLLOUT_ACTIONS).map(([action, states]) => h('button', {
      type: 'button', class: action === 'pause' || action === 'resume' ? '' : 'secondary',
      'data-action': action, disabled: !can('operator') || !states.includes(r.state) || ui.busy,
      title: can('operator') ? '' : 'operators and admins only', onclick: () => act(r.id, action),
    }, action[0].toUpperCase() + action.slice(1)));
    out.push(h('div', { class: 'card rollout', 'data-rollout': r.id, 'data-state': r.state },
      h('div', { class: 'row' }, h('b', {}, r.id), ' ', r.spec.model, ' → release ', r.spec.release, ' ',
        h('span', { class: 'state' }, badge(r.state)),
        h('span', { class: 'muted' }, 'by ' + r.created_by + ', ' + ago(r.created_ms))),
      r.reason ? h('p', { class: 'muted' }, 'Reason: ' + r.reason) : null,
      h('div', { class: 'row' }, h('div', { class: 'progress' }, bar),
        h('span', { class: 'committed' }, done + ' of ' + r.devices.length + ' committed'),
        h('span', {}, 'wave ' + (r.wave + 1) + ' of ' + r.waves.length + ' (' + r.waves.join(', ') + ')'),
        count('failed') ? h('span', { class: 'error' }, count('failed') + ' failed') : null),
      h('div', { class: 'row' }, buttons, can('operator')
        ? h('input', { id: 'reason-' + r.id, placeholder: 'reason (audited)', size: 28 }) : null),
      h('div', { class: 'scroll' }, h('table', {},
        h('tr', {}, ['Device', 'Wave', 'State', 'Phase', 'From', 'Reason'].map(t => h('th', {}, t))),
        r.devices.map(d => h('tr', { 'data-device': d.device }, h('td', {}, d.device),
          h('td', {}, d.wave === 0 ? 'canary' : d.wave), h('td', {}, badge(d.state)),
          h('td', {}, d.phase || '—'), h('td', {}, d.previous === null ? '—' : 'r' + d.previous),
          h('td', {}, d.reason || '')))))));
  }
  return out;
}

/** What each drift metric is, as the legend says it. */
const METRICS = { shift: 'mean shift in reference σ', psi: 'PSI', js: 'Jensen-Shannon distance', ks: 'KS distance' };

async function viewDrift() {
  const models = await api('/api/v1/models');
  const d = ui.drift;
  const choices = models.map(m => m.model + '|' + m.release);
  if (!d.model && models.length) {
    const newest = models[models.length - 1];
    d.model = newest.model; d.release = String(newest.release);
  }
  const q = 'model=' + encodeURIComponent(d.model) + '&release=' + encodeURIComponent(d.release);
  const [summary, events] = await Promise.all([
    d.model ? api('/api/v1/drift?by=site&' + q) : Promise.resolve([]), api('/api/v1/drift/events')]);
  const picker = h('select', { id: 'release-picker', onchange: e => {
    const [m, r] = e.target.value.split('|'); d.model = m; d.release = r; d.cell = null; render();
  } }, choices.map(c => h('option', { value: c, selected: c === d.model + '|' + d.release },
    c.replace('|', ' release '))));
  const sites = [...new Set(summary.map(s => s.site || '(no site)'))].sort();
  const features = [...new Set(summary.map(s => s.feature))];
  const cell = new Map(summary.map(s => [(s.site || '(no site)') + '|' + s.feature, s]));
  const judged = summary.length ? summary[0] : null;
  const out = [h('h1', {}, 'Drift'), h('div', { class: 'row' }, 'Model release: ', picker,
    h('span', { class: 'muted', id: 'drift-legend' }, judged
      ? `cells: ${METRICS[judged.metric]} of the site's merged histogram (warn at ${judged.warn_at}, drift at ${judged.drift_at}); colour: verdict. Click a cell for its trend.`
      : ''))];
  if (!summary.length) out.push(h('p', { class: 'muted' }, 'No drift reports for this release yet.'));
  else {
    out.push(h('div', { class: 'scroll' }, h('table', { class: 'heat', id: 'heatmap' },
      h('tr', {}, h('th', {}, 'Feature'), sites.map(s => h('th', {}, s))),
      features.map(f => h('tr', { 'data-feature': f }, h('td', {}, f), sites.map(site => {
        const s = cell.get(site + '|' + f);
        if (!s) return h('td', { class: 'cell' }, '');
        const selected = d.cell && d.cell.site === site && d.cell.feature === f;
        return h('td', { class: 'cell sev-' + s.severity + (selected ? ' selected' : ''),
          'data-site': site, 'data-feature': f, 'data-severity': s.severity,
          title: `${f} at ${site}: ${s.severity}, ${s.n} values from ${s.devices} device(s), ${s.reports} report(s)`,
          onclick: () => { d.cell = { site, feature: f }; render(); } }, num(s.score, 2));
      }))))));
  }
  if (d.cell) out.push(...await driftTrend(q));
  out.push(h('h2', {}, 'Retraining recommended'));
  out.push(events.length ? h('div', { class: 'scroll' }, h('table', { id: 'retraining' },
    h('tr', {}, ['Time', 'Model', 'Release', 'Features', 'Why'].map(t => h('th', {}, t))),
    events.slice().reverse().map(e => h('tr', {}, h('td', {}, when(e.raised_ms)), h('td', {}, e.model),
      h('td', {}, e.release), h('td', {}, (e.features || []).map(f => f.feature).join(', ')),
      h('td', {}, e.reason)))))
    : h('p', { class: 'muted' }, 'None.'));
  return out;
}

async function driftTrend(q) {
  const d = ui.drift;
  const site = d.cell.site === '(no site)' ? '' : '&site=' + encodeURIComponent(d.cell.site);
  const rows = await api('/api/v1/drift?by=bucket&bucket_s=' + d.bucket + '&' + q + site +
    '&feature=' + encodeURIComponent(d.cell.feature));
  const points = rows.filter(r => r.score !== null).map(r => [r.bucket_ms, r.score]);
  const judged = rows.length ? rows[0] : { metric: 'shift', warn_at: null, drift_at: null };
  const bucket = h('select', { id: 'bucket-picker', onchange: e => { d.bucket = Number(e.target.value); render(); } },
    [[10, '10 s'], [60, '1 min'], [3600, '1 h'], [86400, '1 day']].map(([v, t]) =>
      h('option', { value: v, selected: v === d.bucket }, t)));
  const marks = judged.warn_at === null ? [] : [{ y: judged.warn_at, label: 'warn', color: '#c05621' },
    { y: judged.drift_at, label: 'drift', color: '#c53030' }];
  const chart = lineChart(points, { label: 'drift trend', xFormat: x => when(x).slice(11), marks });
  const table = h('table', {},
    h('tr', {}, ['Bucket', 'Verdict', METRICS[judged.metric], 'PSI', 'Values', 'Devices', 'Flags']
      .map(t => h('th', {}, t))),
    rows.slice(-12).reverse().map(r => h('tr', {}, h('td', {}, when(r.bucket_ms)),
      h('td', {}, badge(r.severity)), h('td', {}, num(r.score, 2)), h('td', {}, num(r.psi, 3)), h('td', {}, r.n),
      h('td', {}, r.devices),
      h('td', {}, Object.entries(r.flags || {}).map(([k, v]) => k + ' ' + v).join(', ')))));
  const close = h('button', { type: 'button', class: 'secondary',
    onclick: () => { d.cell = null; render(); } }, 'Close');
  return [h('h2', { id: 'trend-title' }, d.cell.feature + ' at ' + d.cell.site + ' over time'),
    h('div', { class: 'row' }, 'Buckets: ', bucket, close),
    h('div', { class: 'card', id: 'drift-trend' }, chart, table)];
}

async function acknowledge(alert) {
  ui.busy = true;
  try {
    const r = await api('/api/v1/alerts/' + encodeURIComponent(alert.device) + '/' + alert.seq + '/ack',
      { method: 'POST', json: { note: 'acknowledged on the dashboard' } });
    ui.notice = 'Alert on ' + alert.device + '/' + alert.asset + ' acknowledged by ' + r.acknowledged_by + '.';
    ui.error = '';
  } catch (e) {
    ui.error = 'Acknowledging refused: ' + e.message;
  } finally {
    ui.busy = false;
  }
  render();
}

async function viewAlerts() {
  const alerts = await api('/api/v1/alerts?limit=500' + (ui.openOnly ? '&open=true' : ''));
  const toggle = h('input', { type: 'checkbox', id: 'open-only', checked: ui.openOnly,
    onchange: e => { ui.openOnly = e.target.checked; render(); } });
  return [h('h1', {}, 'Alerts'), h('label', { class: 'row' }, toggle, 'open only'),
    alerts.length ? h('div', { class: 'scroll' }, h('table', { id: 'alerts' },
      h('tr', {}, ['Time', 'Device', 'Site', 'Asset', 'Change', 'Value', 'Cycle', 'Release', 'Acknowledged']
        .map(t => h('th', {}, t))),
      alerts.map(a => h('tr', { 'data-device': a.device, 'data-seq': a.seq, 'data-open': a.open },
        h('td', {}, when(a.at_ms)),
        h('td', {}, h('a', { href: '#/device/' + encodeURIComponent(a.device) }, a.device)),
        h('td', {}, a.site || '—'), h('td', {}, a.asset), h('td', {}, badge(a.from), ' → ', badge(a.to)),
        h('td', {}, num(a.value, 1)), h('td', {}, a.cycle), h('td', {}, a.release),
        h('td', { class: 'ack' }, a.acknowledged_by
          ? 'by ' + a.acknowledged_by + ', ' + ago(a.acknowledged_at_ms)
          : a.open ? h('button', { type: 'button', 'data-ack': a.device + '/' + a.seq,
            disabled: !can('operator') || ui.busy, title: can('operator') ? '' : 'operators and admins only',
            onclick: () => acknowledge(a) }, 'Acknowledge')
            : h('span', { class: 'muted' }, a.current ? '' : 'superseded'))))))
      : h('p', { class: 'muted' }, ui.openOnly ? 'No open alerts.' : 'No alerts yet.')];
}

async function viewModels() {
  const models = await api('/api/v1/models');
  return [h('h1', {}, 'Model registry'), models.length ? h('div', { class: 'scroll' }, h('table', { id: 'models' },
    h('tr', {}, ['Model', 'Release', 'Version', 'Asset type', 'Size', 'SHA-256', 'Registered', 'By']
      .map(t => h('th', {}, t))),
    models.slice().reverse().map(m => h('tr', { 'data-model': m.model, 'data-release': m.release },
      h('td', {}, m.model), h('td', {}, m.release), h('td', {}, m.version), h('td', {}, m.asset_type),
      h('td', {}, (m.size / 1024).toFixed(1) + ' KiB'), h('td', { title: m.sha256 }, m.sha256.slice(0, 12) + '…'),
      h('td', {}, when(m.registered_ms)), h('td', {}, m.registered_by)))))
    : h('p', { class: 'muted' }, 'No releases registered. Register one with `millwright model register`.')];
}

async function viewAudit() {
  const rows = await api('/api/v1/audit?limit=300');
  return [h('h1', {}, 'Audit log'), rows.length ? h('div', { class: 'scroll' }, h('table', { id: 'audit' },
    h('tr', {}, ['Time', 'Who', 'Action', 'Target', 'Reason', 'Detail'].map(t => h('th', {}, t))),
    rows.map(r => h('tr', { 'data-action': r.action }, h('td', {}, when(r.at_ms)), h('td', {}, r.actor),
      h('td', {}, r.action), h('td', {}, r.target), h('td', {}, r.reason), h('td', { class: 'muted' }, r.detail)))))
    : h('p', { class: 'muted' }, 'Nothing yet.')];
}

// ---------- sign-in and the frame ----------

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  session.token = null; session.user = null;
  ui.error = message || ''; ui.notice = '';
  render();
}

function viewSignIn() {
  const token = h('input', { id: 'token', type: 'password', autocomplete: 'current-password', required: true });
  // Password managers (and Chromium's form checks) expect a user name beside a password.
  const user = h('input', { type: 'text', name: 'username', autocomplete: 'username', value: 'token', hidden: true });
  const form = h('form', { class: 'card signin', id: 'signin', onsubmit: async e => {
    e.preventDefault();
    session.token = document.getElementById('token').value.trim();
    try {
      session.user = await api('/api/v1/session');
      sessionStorage.setItem(TOKEN_KEY, session.token);
      ui.error = '';
      if (!location.hash || location.hash === '#/signin') location.hash = '#/fleet';
      render();
    } catch (err) {
      session.token = null;
      ui.error = 'Sign-in refused: ' + err.message;
      render();
    }
  } }, h('h1', {}, 'Sign in'),
  h('label', { for: 'token' }, 'Access token (from the server\'s [[users]] configuration)'), user, token,
  h('button', { type: 'submit' }, 'Sign in'));
  return [form];
}

const VIEWS = { fleet: viewFleet, device: viewDevice, rollouts: viewRollouts, drift: viewDrift,
  alerts: viewAlerts, models: viewModels, audit: viewAudit };

let rendering = false;
let again = false;

/** Draws the current view; a call while drawing draws once more afterwards. */
async function render() {
  if (rendering) { again = true; return; }
  rendering = true;
  const main = document.getElementById('main');
  try {
    if (session.token && !session.user) {
      try {
        session.user = await api('/api/v1/session');
      } catch (e) {
        sessionStorage.removeItem(TOKEN_KEY);
        session.token = null;
        ui.error = 'Sign in again: ' + e.message;
      }
    } else if (!session.user && !session.probed) {
      // A server without users lets everyone read as its anonymous viewer.
      session.probed = true;
      try {
        const health = await api('/api/v1/health');
        if (!health.sign_in_required) session.user = await api('/api/v1/session');
      } catch (e) {
        ui.error = 'The server does not answer: ' + e.message;
      }
    }
    const [, name, arg] = (location.hash || '#/fleet').split('/');
    const signedIn = !!session.user;
    document.getElementById('nav').hidden = !signedIn;
    document.getElementById('signout').hidden = !signedIn || session.user.open;
    document.getElementById('who').textContent = !signedIn ? ''
      : session.user.open ? 'read only: this server has no users to sign in as'
        : 'signed in as ' + session.user.name + ' (' + session.user.role + ')';
    for (const a of document.querySelectorAll('#nav a')) {
      a.classList.toggle('active', a.dataset.view === name || (name === 'device' && a.dataset.view === 'fleet'));
    }
    let content;
    if (!signedIn) content = viewSignIn();
    else {
      const view = VIEWS[name] || viewFleet;
      try {
        content = await view(decodeURIComponent(arg || ''));
      } catch (e) {
        content = [h('p', { class: 'error' }, 'Could not load this page: ' + e.message)];
      }
    }
    morph(main, h('div', {},
      ui.error ? h('p', { class: 'error', id: 'error' }, ui.error) : null,
      ui.notice ? h('p', { class: 'notice', id: 'notice' }, ui.notice) : null,
      ...content));
    document.body.dataset.view = signedIn ? (VIEWS[name] ? name : 'fleet') : 'signin';
    document.getElementById('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
  } finally {
    rendering = false;
    if (again) { again = false; render(); }
  }
}

document.getElementById('signout').addEventListener('click', () => signOut('Signed out.'));
window.addEventListener('hashchange', () => { ui.notice = ''; ui.error = ''; render(); });
setInterval(() => {
  const typing = document.activeElement && document.activeElement.id === 'token';
  if (!typing && !ui.busy) render();
}, REFRESH_MS);
render();
