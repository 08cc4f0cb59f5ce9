// Ozone's staff dashboard: one module for every page (the page's name is <body data-page>).
// Pages are clients of the staff JSON API with the session cookie; the server pushes change
// hints over Server-Sent Events (/api/stream/) and pages re-read what they show, patching
// table rows in place so scroll position, focus and open controls survive an update.
// Data only ever reaches the page as text (textContent), never as HTML.

const page = document.body.dataset.page;
const $ = (selector, root = document) => root.querySelector(selector);

// ---------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, body) {
    super((body && (body.detail || body.error)) || `request failed (HTTP ${status})`);
    this.status = status;
    this.code = body && body.code;
  }
}

function toLogin() {
  const here = location.pathname + location.search;
  location.assign('/login/?next=' + encodeURIComponent(here));
}

async function api(method, path, body) {
  const init = { method, credentials: 'same-origin', headers: { Accept: 'application/json' } };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (_) {
    throw new ApiError(0, { detail: 'the server cannot be reached; retrying' });
  }
  if (resp.status === 401 && page !== 'login') {
    toLogin();
    throw new ApiError(401, { detail: 'your session has ended; please log in again' });
  }
  const text = await resp.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch (_) {
      data = { detail: text.slice(0, 200) };
    }
  }
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

// ---------------------------------------------------------------- small DOM helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? '' : value);
  }
  for (const child of children) node.append(child);
  return node;
}

function setText(node, text) {
  const value = text === undefined || text === null ? '' : String(text);
  if (node.textContent !== value) node.textContent = value;
}

function setAttr(node, name, value) {
  if (value === null || value === undefined) {
    if (node.hasAttribute(name)) node.removeAttribute(name);
  } else if (node.getAttribute(name) !== String(value)) {
    node.setAttribute(name, value);
  }
}

let flashTimer = null;
function flash(message, ok = false) {
  const box = $('#flash');
  box.textContent = message;
  box.classList.toggle('ok', ok);
  box.hidden = false;
  clearTimeout(flashTimer);
  flashTimer = setTimeout(() => { box.hidden = true; }, ok ? 4000 : 10000);
}

function showError(err) {
  if (err instanceof ApiError && err.status === 401) return;
  flash(err.message || String(err));
}

/** Runs `action` for a button, disabling it meanwhile; API errors become a message. */
async function busy(button, action) {
  if (button) button.disabled = true;
  try {
    return await action();
  } catch (err) {
    showError(err);
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

// ---------------------------------------------------------------- times

function ago(iso) {
  if (!iso) return '—';
  const seconds = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
  if (seconds < 5) return 'just now';
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

function exact(iso) {
  return iso ? new Date(iso).toLocaleString() : '';
}

/** A relative time with the exact local time on hover; kept current by the ticker below. */
function setTime(node, iso) {
  const value = iso || '';
  if (node.dataset.time !== value) {
    node.dataset.time = value;
    setAttr(node, 'title', iso ? exact(iso) : null);
  }
  setText(node, ago(iso));
}

setInterval(() => {
  for (const node of document.querySelectorAll('[data-time]')) setText(node, ago(node.dataset.time));
}, 5000);

function setBadge(node, status) {
  let badge = node.firstElementChild;
  if (!badge || !badge.classList.contains('badge')) {
    node.textContent = '';
    badge = el('span');
    node.append(badge);
  }
  const cls = `badge ${status || 'loading'}`;
  if (badge.className !== cls) badge.className = cls;
  setText(badge, status || 'loading');
}

// ---------------------------------------------------------------- tables

/**
 * Makes `tbody` show `items` in order, one row per key: existing rows are updated in place
 * (the same DOM node), new ones created, missing ones removed.
 */
function patchRows(tbody, items, keyOf, render, empty = 'Nothing to show') {
  const rows = new Map();
  for (const tr of [...tbody.rows]) {
    if (tr.dataset.key !== undefined) rows.set(tr.dataset.key, tr);
    else tr.remove();
  }
  let previous = null;
  for (const item of items) {
    const key = String(keyOf(item));
    let tr = rows.get(key);
    if (tr) rows.delete(key);
    else {
      tr = document.createElement('tr');
      tr.dataset.key = key;
    }
    render(item, tr);
    const wanted = previous ? previous.nextSibling : tbody.firstChild;
    if (tr !== wanted) tbody.insertBefore(tr, wanted);
    previous = tr;
  }
  for (const tr of rows.values()) tr.remove();
  if (!items.length) {
    const columns = tbody.closest('table').tHead.rows[0].cells.length;
    tbody.append(el('tr', { class: 'placeholder' }, el('td', { colspan: columns, text: empty })));
  }
}

function cellsOf(tr, count) {
  while (tr.cells.length < count) tr.insertCell();
  return tr.cells;
}

/** A cell holding one link, updated in place. */
function setLink(td, href, text) {
  let a = td.firstElementChild;
  if (!a || a.tagName !== 'A') {
    td.textContent = '';
    a = el('a');
    td.append(a);
  }
  setAttr(a, 'href', href);
  setText(a, text);
}

// ---------------------------------------------------------------- refresh and live updates

/**
 * Coalesces reload requests: one load at a time, at most one a second, and a request made
 * during a load runs once more after it.
 */
function refresher(load) {
  let running = false;
  let again = false;
  let timer = null;
  let lastStart = 0;
  async function run() {
    timer = null;
    if (running) {
      again = true;
      return;
    }
    running = true;
    lastStart = Date.now();
    try {
      await load();
    } catch (err) {
      showError(err);
    } finally {
      running = false;
      if (again) {
        again = false;
        schedule();
      }
    }
  }
  function schedule() {
    if (timer) return;
    const wait = Math.max(50, 1000 - (Date.now() - lastStart));
    timer = setTimeout(run, wait);
  }
  // Status thresholds pass with time, and other processes change things too.
  setInterval(schedule, 30000);
  return { now: run, soon: schedule };
}

/** Follows the server's change feed; `onChange` gets {devices, events, commands, resync}. */
function live(onChange) {
  const indicator = $('#live');
  indicator.hidden = false;
  let source;
  const connect = () => {
    source = new EventSource('/api/stream/');
    source.addEventListener('ready', () => {
      indicator.classList.add('on');
      indicator.title = 'Live updates: connected';
      // Whatever changed while disconnected.
      onChange({ devices: [], events: [], commands: [], resync: true });
    });
    source.addEventListener('change', (event) => {
      try {
        onChange(JSON.parse(event.data));
      } catch (err) {
        showError(err);
      }
    });
    source.addEventListener('error', () => {
      indicator.classList.remove('on');
      indicator.title = 'Live updates: reconnecting';
      if (source.readyState === EventSource.CLOSED) {
        // Refused (not a dropped connection): check the session, then try again.
        api('GET', '/api/auth/user/').catch(() => {});
        setTimeout(connect, 5000);
      }
    });
  };
  connect();
  // A browser keeps only a few connections per site (six over HTTP/1.1): a page that is left,
  // even into the back/forward cache, gives its feed's connection back, and takes a new one
  // when it is shown again.
  window.addEventListener('pagehide', () => source.close());
  window.addEventListener('pageshow', (event) => {
    if (event.persisted) connect();
  });
}

const anyDevice = (change) => change.resync || change.devices.length > 0 || change.events.length > 0;

// ---------------------------------------------------------------- session and header

let me = null;
const canEdit = () => me && (me.is_staff || me.is_superuser);

async function session() {
  const reply = await api('GET', '/api/auth/user/');
  me = reply.user || reply;
  $('#nav').hidden = false;
  for (const a of document.querySelectorAll('#nav a')) {
    if (location.pathname.startsWith(a.getAttribute('href'))) a.setAttribute('aria-current', 'page');
  }
  $('#whoami').textContent = me.username + (canEdit() ? '' : ' (read-only)');
  const logout = $('#logout');
  logout.hidden = false;
  logout.addEventListener('click', () =>
    busy(logout, async () => {
      await api('POST', '/api/auth/logout/');
      location.assign('/login/');
    }),
  );
  if (!canEdit()) {
    document.body.classList.add('readonly');
    for (const node of document.querySelectorAll('.staff-only')) node.remove();
  }
}

// ---------------------------------------------------------------- pages

const pages = {};

pages.login = () => {
  const form = $('#login-form');
  const error = $('#login-error');
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    error.hidden = true;
    busy($('#login-submit'), async () => {
      try {
        await api('POST', '/api/auth/login/', {
          username: $('#username').value,
          password: $('#password').value,
        });
      } catch (err) {
        error.textContent = err.message;
        error.hidden = false;
        return;
      }
      const next = new URLSearchParams(location.search).get('next') || '';
      // Only a path on this site.
      location.assign(/^\/(?![/\\])/.test(next) ? next : '/devices/');
    });
  });
};

function deviceHref(deviceId) {
  return `/devices/${encodeURIComponent(deviceId)}/`;
}

function machineLabel(bound) {
  if (!bound) return 'unassigned';
  return bound.machine_code ? `${bound.name} (${bound.machine_code})` : bound.name;
}

pages.devices = async () => {
  const tbody = $('#devices tbody');
  const filters = { status: $('#f-status'), outlet: $('#f-outlet'), search: $('#f-search') };
  let devices = [];
  let total = 0;

  const outlets = await api('GET', '/api/outlets/?limit=1000');
  for (const outlet of outlets.results) {
    filters.outlet.append(el('option', { value: outlet.id, text: outlet.name }));
  }

  const render = () => {
    const status = filters.status.value;
    const outlet = filters.outlet.value;
    const words = filters.search.value.trim().toLowerCase();
    const shown = devices.filter((d) => {
      if (status && d.status !== status) return false;
      if (outlet && String(d.bound_machine ? d.bound_machine.outlet_id : '') !== outlet) return false;
      if (!words) return true;
      const b = d.bound_machine || {};
      return [d.device_id, d.mac, d.firmware, d.notes, b.name, b.machine_code, b.outlet_name]
        .some((v) => v && String(v).toLowerCase().includes(words));
    });
    patchRows(tbody, shown, (d) => d.device_id, renderDevice, 'No devices');
    const online = devices.filter((d) => d.status === 'online').length;
    const more = total > devices.length ? ` (first ${devices.length} of ${total})` : '';
    setText($('#summary'), `${shown.length} shown · ${online} online · ${devices.length} devices${more}`);
  };

  const renderDevice = (d, tr) => {
    const c = cellsOf(tr, 11);
    setBadge(c[0], d.status);
    setLink(c[1], deviceHref(d.device_id), d.device_id);
    setText(c[2], d.bound_machine ? d.bound_machine.outlet_name || '—' : '—');
    setText(c[3], machineLabel(d.bound_machine));
    for (const [i, key] of [[4, 'basic'], [5, 'standard'], [6, 'premium']]) {
      c[i].className = 'num';
      setText(c[i], d.counts[key]);
    }
    setText(c[7], d.firmware || '—');
    setTime(c[8], d.last_seen);
    setTime(c[9], d.last_poll);
    setText(c[10], d.mqtt_connected ? 'connected' : '—');
  };

  const refresh = refresher(async () => {
    const data = await api('GET', '/api/devices/?limit=1000');
    devices = data.results;
    total = data.count;
    render();
  });
  for (const input of Object.values(filters)) input.addEventListener('input', render);
  await refresh.now();
  live((change) => {
    if (anyDevice(change)) refresh.soon();
  });
};

pages.device = async () => {
  const deviceId = decodeURIComponent(location.pathname.split('/').filter(Boolean)[1] || '');
  const base = `/api/devices/${encodeURIComponent(deviceId)}/`;
  const commandsPath = `/api/device/${encodeURIComponent(deviceId)}/commands/status/?limit=50`;
  const notes = $('#notes');
  let notesDirty = false;
  notes.addEventListener('input', () => { notesDirty = true; });
  if (!canEdit()) {
    notes.closest('label').hidden = true;
    $('#notes-view').hidden = false;
  }

  const field = (name) => $(`#d-facts [data-field="${name}"]`);
  const loadDevice = refresher(async () => {
    let d;
    try {
      d = await api('GET', base);
    } catch (err) {
      if (err.status === 404) {
        setText($('#d-title'), `Device ${deviceId} not found`);
        setBadge($('#d-status').parentNode, null);
        return;
      }
      throw err;
    }
    document.title = `${d.device_id} · Ozone`;
    setText($('#d-title'), d.device_id);
    const badge = $('#d-status');
    badge.className = `badge ${d.status}`;
    setText(badge, d.status);
    setText(field('mac'), d.mac);
    setText(field('firmware'), d.firmware || '—');
    setText(field('machine'), machineLabel(d.bound_machine));
    setText(field('outlet'), d.bound_machine ? d.bound_machine.outlet_name || '—' : '—');
    setText(field('counts'), `Basic ${d.counts.basic} · Standard ${d.counts.standard} · Premium ${d.counts.premium}`);
    setTime(field('last_seen'), d.last_seen);
    setTime(field('last_poll'), d.last_poll);
    setText(field('mqtt'), d.mqtt_connected ? 'connected' : 'not connected');
    setText(field('wifi'), d.wifi_connected ? 'connected' : 'not connected');
    setText(field('uptime'), d.uptime_seconds == null ? '—' : `${Math.round(d.uptime_seconds / 60)} min`);
    setTime(field('created_at'), d.created_at);
    setText($('#notes-view'), d.notes || 'No notes');
    if (!notesDirty && document.activeElement !== notes) notes.value = d.notes || '';
  });

  const commandActions = (cmd, td) => {
    if (!canEdit()) return;
    const retry = ['failed', 'timeout', 'cancelled'].includes(cmd.status);
    const cancel = ['pending', 'sent'].includes(cmd.status);
    const want = retry ? 'retry' : cancel ? 'cancel' : '';
    if (td.dataset.action === want) return;
    td.dataset.action = want;
    td.textContent = '';
    if (!want) return;
    const button = el('button', {
      type: 'button',
      class: retry ? 'secondary' : 'danger',
      text: retry ? 'Retry' : 'Cancel',
    });
    button.addEventListener('click', () =>
      busy(button, async () => {
        const id = td.closest('tr').dataset.key;
        await api('POST', `/api/commands/${encodeURIComponent(id)}/${want}/`);
        flash(retry ? 'Command queued again' : 'Command cancelled', true);
        loadCommands.now();
      }),
    );
    td.append(el('div', { class: 'actions' }, button));
  };

  const renderCommand = (cmd, tr) => {
    const c = cellsOf(tr, canEdit() ? 9 : 8);
    setBadge(c[0], cmd.status);
    setText(c[1], cmd.command_id);
    setText(c[2], cmd.command_type);
    c[3].className = 'num';
    setText(c[3], cmd.priority);
    setTime(c[4], cmd.created_at);
    setTime(c[5], cmd.sent_at);
    setTime(c[6], cmd.executed_at);
    c[7].className = 'wrap';
    const result = cmd.error_message || (cmd.response_data == null ? '' : JSON.stringify(cmd.response_data));
    setText(c[7], result.length > 200 ? result.slice(0, 200) + '…' : result);
    if (canEdit()) commandActions(cmd, c[8]);
  };

  const loadCommands = refresher(async () => {
    const data = await api('GET', commandsPath);
    patchRows($('#commands tbody'), data.results, (c) => c.command_id, renderCommand, 'No commands yet');
  });

  if (canEdit()) {
    $('#notes-form').addEventListener('submit', (event) => {
      event.preventDefault();
      busy(event.submitter, async () => {
        await api('PATCH', base, { notes: notes.value });
        notesDirty = false;
        flash('Notes saved', true);
        loadDevice.now();
      });
    });
    $('#reset-token').addEventListener('click', (event) => {
      if (!confirm(`Forget the token of ${deviceId}? The device must handshake again.`)) return;
      busy(event.currentTarget, async () => {
        const reply = await api('POST', `${base}reset-token/`);
        flash(reply.message, true);
      });
    });
    $('#command-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const error = $('#c-error');
      error.hidden = true;
      const body = { command_type: $('#c-type').value.trim() };
      const problems = [];
      if (!body.command_type) problems.push('the command type is required');
      const payload = $('#c-payload').value.trim();
      if (payload) {
        try {
          body.payload = JSON.parse(payload);
        } catch (err) {
          problems.push(`the payload is not valid JSON (${err.message})`);
        }
      }
      const priority = $('#c-priority').value.trim();
      if (priority) {
        if (!/^-?\d+$/.test(priority)) problems.push('the priority must be a whole number');
        else body.priority = Number(priority);
      }
      const expires = $('#c-expires').value.trim();
      if (expires) {
        if (!/^\d+$/.test(expires) || Number(expires) < 1) problems.push('the expiry must be a positive number of seconds');
        else body.expires_in = Number(expires);
      }
      const description = $('#c-description').value.trim();
      if (description) body.description = description;
      if (problems.length) {
        error.textContent = problems.join('; ');
        error.hidden = false;
        return;
      }
      busy($('#c-send'), async () => {
        const cmd = await api('POST', `/api/device/${encodeURIComponent(deviceId)}/commands/create/`, body);
        flash(`Command ${cmd.command_id} queued`, true);
        loadCommands.now();
      });
    });
  }

  await Promise.all([loadDevice.now(), loadCommands.now()]);
  live((change) => {
    if (change.resync || change.devices.includes(deviceId) || change.events.includes(deviceId)) loadDevice.soon();
    if (change.resync || change.commands.some((c) => c.device_id === deviceId)) loadCommands.soon();
  });
};

pages.machines = async () => {
  const tbody = $('#machines tbody');
  const search = $('#f-search');
  let machines = [];
  let free = [];
  const outlets = await api('GET', '/api/outlets/?limit=1000');
  if (canEdit()) {
    for (const outlet of outlets.results) {
      $('#m-outlet').append(el('option', { value: outlet.id, text: outlet.name }));
    }
  }

  const picker = (m, td) => {
    let select = td.querySelector('select');
    if (!select) {
      td.textContent = '';
      select = el('select', { 'aria-label': `Device for ${m.name}` });
      const assign = el('button', { type: 'button', class: 'secondary', text: 'Assign' });
      assign.addEventListener('click', () => {
        if (!select.value) return flash('Pick a device first');
        busy(assign, async () => {
          const id = td.closest('tr').dataset.key;
          await api('POST', `/api/machines/${id}/assign/`, { device_id: select.value });
          flash(`${select.value} assigned`, true);
          refresh.now();
        });
      });
      td.append(el('div', { class: 'actions' }, select, assign));
    }
    // An open picker keeps its options until it closes.
    if (document.activeElement === select) return;
    const wanted = ['', ...free.map((d) => d.device_id)];
    const have = [...select.options].map((o) => o.value);
    if (wanted.join('\n') !== have.join('\n')) {
      const chosen = select.value;
      select.textContent = '';
      select.append(el('option', { value: '', text: free.length ? 'Choose a device…' : 'No free devices' }));
      for (const d of free) select.append(el('option', { value: d.device_id, text: d.device_id }));
      if (wanted.includes(chosen)) select.value = chosen;
    }
  };

  const actions = (m, td) => {
    const kind = canEdit() ? (m.device_id ? 'bound' : 'free') : 'read';
    if (td.dataset.kind !== kind) {
      td.dataset.kind = kind;
      td.textContent = '';
      const box = el('div', { class: 'actions' });
      box.append(el('a', { class: 'button secondary', href: `/machines/${m.id}/logs/`, text: 'Logs' }));
      if (kind === 'bound') {
        const unassign = el('button', { type: 'button', class: 'secondary', text: 'Unassign' });
        unassign.addEventListener('click', () => {
          const row = machines.find((x) => String(x.id) === td.closest('tr').dataset.key);
          if (!row || !confirm(`Take ${row.device_id} off ${row.name}?`)) return;
          busy(unassign, async () => {
            await api('POST', `/api/machines/${row.id}/unassign/`);
            flash(`${row.device_id} unassigned`, true);
            refresh.now();
          });
        });
        box.append(unassign);
      }
      if (kind !== 'read') {
        const remove = el('button', { type: 'button', class: 'danger', text: 'Delete' });
        remove.addEventListener('click', () => {
          const row = machines.find((x) => String(x.id) === td.closest('tr').dataset.key);
          if (!row || !confirm(`Delete machine ${row.name}? This cannot be undone.`)) return;
          busy(remove, async () => {
            await api('DELETE', `/api/machines/${row.id}/`);
            flash(`${row.name} deleted`, true);
            refresh.now();
          });
        });
        box.append(remove);
      }
      td.append(box);
    }
  };

  const renderMachine = (m, tr) => {
    const c = cellsOf(tr, 9);
    setBadge(c[0], m.device_id ? m.status : 'offline');
    setText(c[1], m.name);
    setText(c[2], m.machine_code || '—');
    setText(c[3], m.outlet_name || '—');
    if (m.device_id) {
      if (c[4].dataset.kind !== 'link') {
        c[4].dataset.kind = 'link';
        c[4].textContent = '';
      }
      setLink(c[4], deviceHref(m.device_id), m.device_id);
    } else if (canEdit()) {
      c[4].dataset.kind = 'picker';
      picker(m, c[4]);
    } else {
      c[4].dataset.kind = 'none';
      setText(c[4], 'no device');
    }
    for (const [i, key] of [[5, 'basic'], [6, 'standard'], [7, 'premium']]) {
      c[i].className = 'num';
      setText(c[i], m.current_counts[key]);
    }
    actions(m, c[8]);
  };

  const render = () => {
    const words = search.value.trim().toLowerCase();
    const shown = machines.filter((m) =>
      !words || [m.name, m.machine_code, m.outlet_name, m.device_id].some((v) => v && String(v).toLowerCase().includes(words)),
    );
    patchRows(tbody, shown, (m) => m.id, renderMachine, 'No machines');
    const bound = machines.filter((m) => m.device_id).length;
    setText($('#summary'), `${shown.length} shown · ${machines.length} machines · ${bound} with a device · ${free.length} free devices`);
  };

  const refresh = refresher(async () => {
    const [list, unassigned] = await Promise.all([
      api('GET', '/api/machines/?limit=1000'),
      canEdit() ? api('GET', '/api/devices/?assigned=false&limit=1000') : Promise.resolve({ results: [] }),
    ]);
    machines = list.results;
    free = unassigned.results;
    render();
  });
  search.addEventListener('input', render);

  if (canEdit()) {
    $('#machine-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const body = { name: $('#m-name').value.trim(), is_active: true };
      const code = $('#m-code').value.trim();
      if (code) body.machine_code = code;
      if ($('#m-outlet').value) body.outlet = Number($('#m-outlet').value);
      busy(event.submitter, async () => {
        const created = await api('POST', '/api/machines/', body);
        flash(`Machine ${created.name} created`, true);
        event.target.reset();
        refresh.now();
      });
    });
  }

  await refresh.now();
  live((change) => {
    if (anyDevice(change)) refresh.soon();
  });
};

pages.outlets = async () => {
  const tbody = $('#outlets tbody');
  const form = $('#outlet-form');
  let outlets = [];
  let machines = [];

  const edit = (o) => {
    form.dataset.id = o.id;
    $('#o-name').value = o.name;
    $('#o-region').value = o.region || '';
    $('#o-address').value = o.address || '';
    $('#o-contact').value = o.contact_person || '';
    setText(form.querySelector('button[type="submit"]'), 'Save');
    setText($('#create-outlet summary'), `Edit ${o.name}`);
    $('#create-outlet').open = true;
    $('#o-name').focus();
  };

  const renderOutlet = (o, tr) => {
    const c = cellsOf(tr, canEdit() ? 11 : 10);
    setText(c[0], o.name);
    setText(c[1], o.region || '—');
    c[2].className = 'wrap';
    setText(c[2], o.address || '—');
    setText(c[3], o.contact_person || '—');
    setText(c[4], o.is_active ? 'yes' : 'no');
    const here = machines.filter((m) => m.outlet === o.id);
    c[5].className = 'num';
    setText(c[5], here.length);
    c[6].className = 'num';
    setText(c[6], here.filter((m) => m.device_id && m.status === 'online').length);
    const t = treatments.get(o.id);
    for (const [i, key] of [[7, 'today'], [8, 'week'], [9, 'total']]) {
      c[i].className = 'num';
      setText(c[i], t ? t[key] : '…');
    }
    if (canEdit() && !c[10].firstChild) {
      const button = el('button', { type: 'button', class: 'secondary', text: 'Edit' });
      button.addEventListener('click', () => {
        const row = outlets.find((x) => String(x.id) === tr.dataset.key);
        if (row) edit(row);
      });
      c[10].append(el('div', { class: 'actions' }, button));
    }
  };

  const render = () => patchRows(tbody, outlets, (o) => o.id, renderOutlet, 'No outlets');
  const refresh = refresher(async () => {
    const [list, machineList] = await Promise.all([
      api('GET', '/api/outlets/?limit=1000'),
      api('GET', '/api/machines/?limit=1000'),
    ]);
    outlets = list.results;
    machines = machineList.results;
    render();
  });
  // Treatments per outlet from the statistics API: today and 7 days (daily buckets in the
  // browser's zone), and all time (monthly buckets over the longest range).
  const treatments = new Map();
  const tz = Intl.DateTimeFormat().resolvedOptions().timeZone || 'UTC';
  const counts = refresher(async () => {
    await Promise.all(outlets.map(async (o) => {
      const [week, ever] = await Promise.all([
        api('GET', `/api/test/stats/?outlet_id=${o.id}&granularity=day&days=7&tz=${encodeURIComponent(tz)}`),
        api('GET', `/api/test/stats/?outlet_id=${o.id}&granularity=month&days=3660&tz=${encodeURIComponent(tz)}`),
      ]);
      const daily = week.series.total;
      treatments.set(o.id, { today: daily[daily.length - 1] || 0, week: week.totals.total, total: ever.totals.total });
    }));
    render();
  });

  if (canEdit()) {
    form.addEventListener('submit', (event) => {
      event.preventDefault();
      const body = {
        name: $('#o-name').value.trim(),
        region: $('#o-region').value.trim(),
        address: $('#o-address').value.trim(),
        contact_person: $('#o-contact').value.trim(),
      };
      const id = form.dataset.id;
      busy(event.submitter, async () => {
        const saved = id
          ? await api('PATCH', `/api/outlets/${id}/`, body)
          : await api('POST', '/api/outlets/', { ...body, is_active: true });
        flash(`Outlet ${saved.name} ${id ? 'saved' : 'created'}`, true);
        form.reset();
        delete form.dataset.id;
        setText(form.querySelector('button[type="submit"]'), 'Create');
        setText($('#create-outlet summary'), 'New outlet');
        refresh.now();
      });
    });
  }

  await refresh.now();
  await counts.now();
  live((change) => {
    if (anyDevice(change)) refresh.soon();
    if (change.resync || change.events.length) counts.soon();
  });
};

pages.logs = async () => {
  const machineId = location.pathname.split('/').filter(Boolean)[1];
  const limit = 50;
  let offset = 0;
  let currentDevice = null;
  const machine = await api('GET', `/api/machines/${encodeURIComponent(machineId)}/`);
  const title = machine.machine_code ? `${machine.name} (${machine.machine_code})` : machine.name;
  setText($('#l-title'), `Treatment logs · ${title}`);
  document.title = `${machine.name} logs · Ozone`;

  const statsCard = (summary) => {
    const card = $('#l-stats');
    const t = summary.totals;
    const c = summary.current_counters;
    const tile = (label, value, key) =>
      el('div', { 'data-stat': key }, label, el('b', { text: value === undefined || value === null ? '—' : value }));
    const tiles = [
      tile('Basic (all time)', t.basic, 'basic'),
      tile('Standard (all time)', t.standard, 'standard'),
      tile('Premium (all time)', t.premium, 'premium'),
      tile('Total (all time)', t.total, 'total'),
      tile('Device', summary.current_device_id || 'none', 'device'),
      tile('Current counters', c ? `${c.basic} / ${c.standard} / ${c.premium}` : '—', 'current'),
    ];
    // Same tiles each time: update their numbers in place.
    if (card.querySelectorAll('[data-stat]').length !== tiles.length) {
      card.textContent = '';
      card.append(el('h2', { text: 'Machine stats' }), el('div', { class: 'totals' }, ...tiles));
      return;
    }
    for (const fresh of tiles) {
      setText(card.querySelector(`[data-stat="${fresh.dataset.stat}"] b`), fresh.querySelector('b').textContent);
    }
  };

  const renderEntry = (e, tr) => {
    const c = cellsOf(tr, 6);
    tr.classList.toggle('reset', e.event === 'reset');
    setText(c[0], exact(e.occurred_at));
    setAttr(c[0], 'title', e.received_at ? `received ${exact(e.received_at)}` : null);
    setText(c[1], e.event === 'reset' ? 'Reset' : `Treatment ${(e.treatment || '').toLowerCase()}`);
    setLink(c[2], deviceHref(e.device_id), e.device_id);
    for (const [i, key] of [[3, 'basic'], [4, 'standard'], [5, 'premium']]) {
      c[i].className = 'num';
      setText(c[i], e.cumulative ? e.cumulative[key] : '—');
    }
  };

  const refresh = refresher(async () => {
    const data = await api('GET', `/api/machines/${encodeURIComponent(machineId)}/logs/?limit=${limit}&offset=${offset}`);
    currentDevice = data.summary.current_device_id || null;
    statsCard(data.summary);
    patchRows($('#logs tbody'), data.results, (e) => e.id, renderEntry, 'No entries yet');
    const last = Math.min(offset + data.results.length, data.count);
    setText($('#l-page'), data.count ? `${offset + 1}–${last} of ${data.count}` : '');
    $('#l-prev').disabled = offset === 0;
    $('#l-next').disabled = last >= data.count;
  });
  $('#l-prev').addEventListener('click', () => {
    offset = Math.max(0, offset - limit);
    refresh.now();
  });
  $('#l-next').addEventListener('click', () => {
    offset += limit;
    refresh.now();
  });
  await refresh.now();
  live((change) => {
    if (change.resync || (currentDevice && (change.events.includes(currentDevice) || change.devices.includes(currentDevice)))) {
      refresh.soon();
    }
  });
};

// A small SVG line chart: one line per series, the previous period dashed.
const SERIES = [
  ['basic', 'Basic', '#1f6feb'],
  ['standard', 'Standard', '#b08800'],
  ['premium', 'Premium', '#8250df'],
  ['total', 'Total', '#1d2430'],
];

function svg(tag, attrs = {}) {
  const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function drawChart(box, stats) {
  const W = 900, H = 320, L = 48, R = 12, T = 12, B = 36;
  const labels = stats.labels;
  const lines = [];
  for (const [key, name, color] of SERIES) {
    lines.push({ key, name, color, values: stats.series[key], dash: '' });
    if (stats.previous) lines.push({ key, name: `${name} (previous)`, color, values: stats.previous.series[key], dash: '5 4', faint: true });
    if (stats.ma) lines.push({ key, name: `${name} (average)`, color, values: stats.ma[key], dash: '1 3' });
  }
  // A top the four grid lines divide into whole numbers.
  const top = Math.max(1, ...lines.flatMap((l) => l.values));
  const max = Math.ceil(top / 4) * 4;
  const x = (i) => L + (labels.length <= 1 ? 0 : (i * (W - L - R)) / (labels.length - 1));
  const y = (v) => T + (H - T - B) * (1 - v / max);
  const chart = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': 'Treatments per period' });
  for (let k = 0; k <= 4; k++) {
    const v = (max * k) / 4;
    chart.append(svg('line', { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: '#dde1e7' }));
    const t = svg('text', { x: L - 6, y: y(v) + 4, 'text-anchor': 'end', 'font-size': 11, fill: '#6b7280' });
    t.textContent = Number.isInteger(v) ? v : v.toFixed(1);
    chart.append(t);
  }
  const step = Math.max(1, Math.ceil(labels.length / 8));
  labels.forEach((label, i) => {
    if (i % step) return;
    const anchor = i === 0 ? 'start' : i + step >= labels.length ? 'end' : 'middle';
    const t = svg('text', { x: x(i), y: H - 12, 'text-anchor': anchor, 'font-size': 11, fill: '#6b7280' });
    t.textContent = label.length > 16 ? label.slice(5, 16) : label;
    chart.append(t);
  });
  // Totals underneath, so a treatment that makes up the whole total stays visible.
  for (const line of [...lines].sort((a, b) => (b.key === 'total') - (a.key === 'total'))) {
    if (!line.values.length) continue;
    const d = line.values.map((v, i) => `${i ? 'L' : 'M'}${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(' ');
    chart.append(svg('path', {
      d, fill: 'none', stroke: line.color, 'stroke-width': line.key === 'total' ? 2.2 : 1.6,
      'stroke-dasharray': line.dash, opacity: line.faint ? 0.45 : 1, 'data-series': line.name,
    }));
  }
  const legend = el('div', { class: 'legend' });
  for (const [, name, color] of SERIES) {
    const swatch = el('span', { text: '■ ' });
    swatch.style.color = color;
    legend.append(el('span', {}, swatch, name));
  }
  if (stats.previous) legend.append(el('span', { class: 'muted', text: 'dashed: previous period' }));
  if (stats.ma) legend.append(el('span', { class: 'muted', text: `dotted: ${stats.ma_window}-bucket average` }));
  box.textContent = '';
  box.append(chart, legend);
}

pages.stats = async () => {
  const form = $('#stats-form');
  const f = {
    outlet: $('#s-outlet'), machine: $('#s-machine'), device: $('#s-device'),
    granularity: $('#s-granularity'), days: $('#s-days'), cumulative: $('#s-cumulative'),
    ma: $('#s-ma'), compare: $('#s-compare'),
  };
  const tz = Intl.DateTimeFormat().resolvedOptions().timeZone || 'UTC';

  const fillSelect = (select, items, value, label) => {
    const chosen = select.value;
    const wanted = ['', ...items.map(value)];
    const have = [...select.options].map((o) => o.value);
    if (wanted.join('\n') === have.join('\n')) return;
    select.textContent = '';
    select.append(el('option', { value: '', text: 'All' }));
    for (const item of items) select.append(el('option', { value: value(item), text: label(item) }));
    select.value = wanted.includes(chosen) ? chosen : '';
  };

  // The cascade: outlet → machines in it → devices on them.
  const loadOptions = async () => {
    const q = new URLSearchParams();
    if (f.outlet.value) q.set('outlet_id', f.outlet.value);
    if (f.machine.value) q.set('machine_id', f.machine.value);
    const options = await api('GET', `/api/test/stats-options/?${q}`);
    fillSelect(f.outlet, options.outlets, (o) => String(o.id), (o) => o.name);
    fillSelect(f.machine, options.machines, (m) => String(m.id), (m) => (m.machine_code ? `${m.name} (${m.machine_code})` : m.name));
    fillSelect(f.device, options.devices, (d) => d.device_id, (d) => d.device_id + (d.current ? '' : ' (before)'));
  };

  const query = () => {
    const q = new URLSearchParams({ granularity: f.granularity.value, tz });
    const days = parseInt(f.days.value, 10);
    if (days > 0) q.set('days', days);
    if (f.outlet.value) q.set('outlet_id', f.outlet.value);
    if (f.machine.value) q.set('machine_id', f.machine.value);
    if (f.device.value) q.set('device_id', f.device.value);
    if (f.cumulative.checked) q.set('cumulative', 'true');
    const ma = parseInt(f.ma.value, 10);
    if (ma > 0) q.set('ma', ma);
    if (f.compare.checked) q.set('compare', 'true');
    return q;
  };

  const renderRow = (row, tr) => {
    const c = cellsOf(tr, 5);
    setText(c[0], row.label);
    for (const [i, key] of [[1, 'basic'], [2, 'standard'], [3, 'premium'], [4, 'total']]) {
      c[i].className = 'num';
      setText(c[i], row[key]);
    }
  };

  const refresh = refresher(async () => {
    const q = query();
    $('#s-csv').href = `/api/test/stats-export.csv?${q}`;
    const stats = await api('GET', `/api/test/stats/?${q}`);
    drawChart($('#chart'), stats);
    const rows = stats.labels.map((label, i) => ({
      label,
      basic: stats.series.basic[i],
      standard: stats.series.standard[i],
      premium: stats.series.premium[i],
      total: stats.series.total[i],
    }));
    rows.push({ label: 'Total', ...stats.totals });
    patchRows($('#stats tbody'), rows, (r) => r.label, renderRow, 'No periods');
  });

  form.addEventListener('submit', (event) => event.preventDefault());
  form.addEventListener('change', async (event) => {
    if ([f.outlet, f.machine].includes(event.target)) {
      if (event.target === f.outlet) f.machine.value = '';
      f.device.value = '';
      await loadOptions().catch(showError);
    }
    refresh.now();
  });
  await loadOptions();
  await refresh.now();
  live((change) => {
    if (change.resync || change.events.length) refresh.soon();
  });
};

// ---------------------------------------------------------------- start

async function start() {
  const setup = pages[page];
  if (!setup) return;
  try {
    if (page !== 'login') await session();
    await setup();
  } catch (err) {
    showError(err);
  }
}

start();
