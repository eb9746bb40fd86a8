// chatd's chat page: one WebSocket to /ws, one JSON packet per text frame
// (docs/protocol.rst). This browser keeps in localStorage who it is (id and
// token), the conversations, and the highest server id it has shown, so
// that a message pushed again after a reconnect is shown once. It acks a
// message once it is stored and on screen. It opts in to receipts (1.2):
// under a sent message ✓ is stored, ✓✓ delivered, a coloured ✓✓ read; and
// it says "read" when a conversation is on screen and the tab is visible.
"use strict";

const $ = (selector) => document.querySelector(selector);

const saved = {
  get(key, otherwise) {
    try {
      const text = localStorage.getItem("chatd." + key);
      return text === null ? otherwise : JSON.parse(text);
    } catch (e) {
      return otherwise;
    }
  },
  set(key, value) { localStorage.setItem("chatd." + key, JSON.stringify(value)); },
};

const KEEP = 200; // messages kept per conversation

// ids are the keys of Maps, never of plain objects: a peer called
// "__proto__", "constructor" or "toString" is a peer like any other.
// Saved as [[key, value], ...] (older pages saved an object).
function toMap(saved) {
  return new Map(Array.isArray(saved) ? saved
    : Object.entries(saved && typeof saved === "object" ? saved : {}));
}

const state = {
  me: saved.get("me", null),          // {id, token} once registered
  chats: toMap(saved.get("chats")),   // peer -> [{out, text, at, id, ref, status}]
  unread: toMap(saved.get("unread")), // peer -> count
  lastId: saved.get("lastId", ""),    // highest server id shown
  peer: saved.get("peer", ""),        // the open conversation
  ws: null,
  serial: 0,         // connections opened, to tell which one a send went on
  bound: false,
  registering: null, // {id, proof} while a register is under way
  retries: 0,
  retryTimer: null,
  stopped: false,    // replaced elsewhere: no reconnect until asked
  ackTimer: null,
  ackId: null,
  readSent: new Map(), // peer -> the highest id said read on this connection
};

// -- the connection ----------------------------------------------------------

function url() {
  return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
}

function send(packet) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify(packet));
    return true;
  }
  return false;
}

function connect() {
  clearTimeout(state.retryTimer);
  if (state.ws) return;
  state.stopped = false;
  const ws = new WebSocket(url());
  state.ws = ws;
  state.serial += 1;
  state.bound = false;
  showStatus("connecting", "connecting…");
  ws.onopen = () => {
    if (state.registering) {
      const packet = {register: "true", sender: state.registering.id, receipts: "true"};
      if (state.registering.proof) packet.proof = state.registering.proof;
      send(packet);
    } else if (state.me) {
      send({reconnect: "true", sender: state.me.id, token: state.me.token, receipts: "true"});
    }
  };
  ws.onmessage = (event) => received(JSON.parse(event.data));
  ws.onclose = () => {
    if (state.ws !== ws) return;
    state.ws = null;
    state.bound = false;
    render();
    if (state.stopped || !(state.me || state.registering)) {
      showStatus("offline", "offline");
      return;
    }
    // back off: 0.5 s, 1 s, 2 s ... 30 s, with some jitter; a server that
    // stops says when to come back (retry_after_ms, 1.2)
    const backoff = Math.min(30000, 500 * 2 ** state.retries) * (0.8 + 0.4 * Math.random());
    const delay = Math.max(backoff, Math.min(state.comeBack || 0, 600000));
    state.comeBack = 0;
    state.retries += 1;
    showStatus("offline", "offline, reconnecting in " + Math.ceil(delay / 1000) + " s");
    state.retryTimer = setTimeout(connect, delay);
  };
}

function bound(pending) {
  state.bound = true;
  state.readSent = new Map();
  state.retries = 0;
  state.registering = null;
  showStatus("online", "online");
  if (pending) notify(pending + (pending === 1 ? " message was" : " messages were") + " waiting for you.");
  // what was written while offline goes now, with its ref: a message the
  // server had already stored is answered "accepted" again, not stored twice
  for (const [peer, messages] of state.chats) {
    for (const m of messages) {
      if (m.out && m.status === "sending" && m.serial !== state.serial) {
        m.serial = state.serial;
        send({message: m.text, receiver: peer, ref: m.ref});
      }
    }
  }
  render();
}

// -- what the server says ----------------------------------------------------

function received(p) {
  switch (p.type) {
    case "registered":
      if (saved.get("owner", p.sender) !== p.sender) {
        // another id in this browser: its server ids are another count
        Object.assign(state, {chats: new Map(), unread: new Map(), lastId: "", peer: ""});
        save();
      }
      state.me = {id: p.sender, token: p.token};
      saved.set("me", state.me);
      saved.set("owner", p.sender);
      bound(0);
      break;
    case "reconnected":
      // the next token (token rotation, 1.2), kept at once: the one we
      // presented stays valid only until this one is used
      if (p.token && state.me) {
        state.me = {id: state.me.id, token: p.token};
        saved.set("me", state.me);
      }
      bound(p.pending);
      break;
    case "message":
      incoming(p);
      break;
    case "receipt":
      receipt(p);
      break;
    case "accepted":
    case "duplicate":
      settle(p.ref, p.type, p.id);
      break;
    case "ping":
      send({ping: "keepalive"});
      break;
    case "error":
      failed(p);
      break;
  }
}

function newer(id, than) {  // server ids: digits, growing
  return id.length > than.length || (id.length === than.length && id > than);
}

function incoming(p) {
  if (!state.me) return;  // signed out meanwhile
  if (newer(p.id, state.lastId)) {  // else: shown before this reconnect
    const peer = p.sender === state.me.id ? p.receiver : p.sender;
    add(peer, {out: false, text: p.message, at: p.sent_at, id: p.id});
    if (peer !== state.peer || document.hidden) {
      state.unread.set(peer, (state.unread.get(peer) || 0) + 1);
    }
    state.lastId = p.id;
    save();
    render();
  }
  ackLater(p.id);
}

// a receipt (1.2): every message sent to p.receiver up to p.upto (its id
// there) is delivered, or read; a read one is never marked delivered again
const RANK = {accepted: 1, delivered: 2, read: 3};

function receipt(p) {
  if (!state.me) return;
  if (newer(p.id, state.lastId)) {
    for (const m of state.chats.get(p.receiver) || []) {
      if (m.out && m.id && !newer(m.id, p.upto) &&
          (RANK[m.status] || 0) < RANK[p.status] && RANK[m.status]) {
        m.status = p.status;
      }
    }
    state.lastId = p.id;
    save();
    render();
  }
  ackLater(p.id);
}

function ackLater(id) {
  // ack once it is stored and shown: the highest id, after this turn
  state.ackId = id;
  if (!state.ackTimer) {
    const serial = state.serial;  // an id is acked on the connection it came on
    state.ackTimer = setTimeout(() => {
      state.ackTimer = null;
      if (serial === state.serial) send({ack: state.ackId});
    }, 0);
  }
}

function settle(ref, status, id) {
  const m = findRef(ref);
  if (!m) return;
  m.status = status;
  if (id) m.id = id;
  if (status === "accepted") m.at = Date.now();
  save();
  render();
}

const SAY = {
  rate_limited: "not sent: you are sending too fast (rate_limited); wait a moment and send again",
  unavailable: "not sent: the server cannot store messages just now (unavailable); send again later",
  unknown_receiver: "not sent: nobody has registered this id (unknown_receiver)",
  inbox_full: "not sent: their inbox is full (inbox_full); try later",
  message_too_long: "not sent: the message is too long (message_too_long)",
};

function failed(p) {
  const m = findRef(p.ref);
  if (m) {
    m.status = "error";
    m.error = (Object.hasOwn(SAY, p.code) && SAY[p.code]) || "not sent: " + p.code + ": " + p.reason;
    save();
    render();
    return;
  }
  switch (p.code) {
    case "shutdown":
      if (Number.isInteger(p.retry_after_ms) && p.retry_after_ms > 0) {
        state.comeBack = p.retry_after_ms;
      }
      break;
    case "session_replaced":
      state.stopped = true;
      notify("This id was opened somewhere else (another tab or device), so this page " +
             "let go of it (session_replaced).", "Use it here", connect);
      break;
    case "bad_token":
    case "revoked": {
      const id = state.me ? state.me.id : "this id";
      signOut();
      const reused = /used elsewhere with an old token/.test(p.reason || "");
      notify("This browser's token for " + id + (reused
        ? ": this id was used elsewhere with an old token, so every token of it is " +
          "revoked (bad_token)."
        : p.code === "revoked"
        ? " was revoked: an old token of it was used elsewhere, or the operator " +
          "revoked it (revoked)."
        : " is no longer valid: the id was registered again elsewhere (bad_token).") +
        " Register again to take it back.");
      $("#id").value = id;
      break;
    }
    case "forbidden":
      if (state.registering) {
        $("#proof-row").hidden = false;
        state.registering = null;
        state.ws && state.ws.close();
        notify("This server needs a registration ticket for the id (forbidden: " +
               p.reason + "). Paste the ticket and register again.");
        break;
      }
      notify(p.code + ": " + p.reason);
      break;
    case "rate_limited":
      notify("Slow down: the server refused a packet (rate_limited).");
      break;
    case "unavailable":
      notify("The server cannot reach its store just now (unavailable): " + p.reason);
      break;
    default:
      notify(p.code + ": " + p.reason);
  }
}

// -- conversations -----------------------------------------------------------

function add(peer, message) {
  let list = state.chats.get(peer);
  if (!list) state.chats.set(peer, list = []);
  list.push(message);
  if (list.length > KEEP) list.splice(0, list.length - KEEP);
}

function findRef(ref) {
  if (ref === null || ref === undefined) return null;
  for (const messages of state.chats.values()) {
    for (const m of messages) if (m.out && m.ref === ref) return m;
  }
  return null;
}

function newRef() {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  return "w-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function save() {
  saved.set("peer", state.peer);
  saved.set("chats", [...state.chats]);
  saved.set("unread", [...state.unread]);
  saved.set("lastId", state.lastId);
}

function open(peer) {
  state.peer = peer;
  state.unread.delete(peer);
  if (!state.chats.has(peer)) state.chats.set(peer, []);
  save();
  render();
  $("#text").focus();
}

function signOut() {
  state.me = null;
  state.registering = null;
  state.stopped = true;
  localStorage.removeItem("chatd.me");
  if (state.ws) state.ws.close();
  render();
}

// -- the screen --------------------------------------------------------------

function showStatus(kind, text) {
  const s = $("#status");
  s.className = kind;
  s.textContent = text;
}

function notify(text, action, onAction) {
  $("#notice").hidden = false;
  $("#notice-text").textContent = text;
  const button = $("#notice-action");
  button.hidden = !action;
  button.textContent = action || "";
  button.onclick = () => { $("#notice").hidden = true; onAction(); };
}

function when(ms) {
  const t = new Date(ms);
  const time = t.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
  return t.toDateString() === new Date().toDateString() ? time
    : t.toLocaleDateString() + " " + time;
}

const STATUS = {sending: "sending…", accepted: "✓ sent", delivered: "✓✓ delivered",
  read: "✓✓ read",
  duplicate:
  "duplicate: the same text went to them moments ago, so it was not sent again"};

function render() {
  const signedIn = !!state.me;
  $("#login").hidden = signedIn;
  $("#chat").hidden = !signedIn;
  $("#signout").hidden = !signedIn;
  $("#me").textContent = signedIn ? state.me.id : "";
  $("#text").disabled = $("#send").disabled = !(signedIn && state.peer);
  if (!signedIn) return;

  const peers = $("#peers");
  peers.replaceChildren();
  const last = (p) => { const l = state.chats.get(p); return l.length ? l[l.length - 1].at : 0; };
  for (const peer of [...state.chats.keys()].sort((a, b) => last(b) - last(a))) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = peer;
    button.className = peer === state.peer ? "current" : "";
    button.onclick = () => open(peer);
    if (state.unread.get(peer)) {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = state.unread.get(peer);
      button.append(" ", badge);
    }
    item.append(button);
    peers.append(item);
  }

  $("#with").textContent = state.peer ? "with " + state.peer : "Choose whom to talk to";
  const log = $("#log");
  log.replaceChildren();
  for (const m of state.chats.get(state.peer) || []) {
    const item = document.createElement("li");
    item.className = (m.out ? "out " : "in ") + (m.status || "");
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = m.text;
    const meta = document.createElement("small");
    meta.textContent = when(m.at) + (m.out ? " · " + (m.status === "error" ? m.error
                                                        : (Object.hasOwn(STATUS, m.status) && STATUS[m.status]) || m.status) : "");
    item.append(text, meta);
    log.append(item);
  }
  log.scrollTop = log.scrollHeight;
  sayRead();
}

// the open conversation is on screen: say so (1.2), once per newer id
function sayRead() {
  if (!state.bound || !state.peer || document.hidden) return;
  const list = state.chats.get(state.peer) || [];
  let high = null;
  for (const m of list) if (!m.out && m.id && (high === null || newer(m.id, high))) high = m.id;
  const said = state.readSent.get(state.peer);
  if (high === null || (said && !newer(high, said))) return;
  state.readSent.set(state.peer, high);
  send({read: high, from: state.peer});
}

// -- what the user does ------------------------------------------------------

$("#login").onsubmit = (event) => {
  event.preventDefault();
  $("#notice").hidden = true;
  state.registering = {id: $("#id").value.trim(), proof: $("#proof").value.trim()};
  if (state.ws && state.ws.readyState === WebSocket.OPEN && !state.bound) {
    state.ws.onopen();
  } else {
    if (state.ws) state.ws.close();
    state.ws = null;
    connect();
  }
};

$("#peer-form").onsubmit = (event) => {
  event.preventDefault();
  open($("#peer").value.trim());
  $("#peer").value = "";
};

$("#compose").onsubmit = (event) => {
  event.preventDefault();
  const text = $("#text").value;
  if (!text || !state.peer) return;
  const m = {out: true, text, at: Date.now(), ref: newRef(), status: "sending"};
  add(state.peer, m);
  if (state.bound) {
    m.serial = state.serial;
    send({message: text, receiver: state.peer, ref: m.ref});
  }
  $("#text").value = "";
  save();
  render();
};

$("#signout").onclick = signOut;

document.addEventListener("visibilitychange", () => {
  if (!document.hidden && state.peer && state.unread.get(state.peer)) open(state.peer);
});

render();
if (state.me) connect();
