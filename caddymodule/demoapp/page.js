
'use strict';

// The LLM gateway demo chat (a demo, not a product). Configuration comes from the JSON block
// the server rendered; everything else lives in this tab's sessionStorage.
const TOKEN_KEY = 'llm_gateway_token';           // the JWT from the sign-in's #token=
const CONVERSATION_KEY = 'llm_demo_conversation'; // the chat so far, kept across the sign-in
const PENDING_KEY = 'llm_demo_pending';           // the prompt that ran out of credits

const config = JSON.parse(document.getElementById('config').textContent);
const $ = (id) => document.getElementById(id);

let conversation = loadConversation();

function loadConversation() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(CONVERSATION_KEY) || '[]');
    return Array.isArray(saved)
      ? saved.filter((m) => m && (m.role === 'user' || m.role === 'assistant') && typeof m.content === 'string')
      : [];
  } catch {
    return [];
  }
}

function saveConversation() {
  sessionStorage.setItem(CONVERSATION_KEY, JSON.stringify(conversation));
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

// takeFragment keeps a token the sign-in sent back in #token=...&state=..., shows an #error=,
// and removes the fragment from the URL so that the token is in no URL, history entry or bookmark.
function takeFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (!params.has('token') && !params.has('state') && !params.has('error')) {
    return;
  }
  history.replaceState(null, '', location.pathname + location.search);
  const received = params.get('token');
  if (received) {
    sessionStorage.setItem(TOKEN_KEY, received);
    $('balance').textContent = '–';
  }
  const error = params.get('error');
  if (error) {
    showError('Sign-in: ' + (params.get('error_description') || error));
  }
}

function render() {
  const list = $('messages');
  list.replaceChildren(...conversation.map((m) => {
    const div = document.createElement('div');
    div.className = m.role;
    div.textContent = m.content;
    return div;
  }));
  list.lastElementChild?.scrollIntoView({ block: 'end' });
}

function showStatus() {
  $('status').textContent = token() ? 'signed in' : 'anonymous';
}

function showError(message) {
  $('error').textContent = message;
  $('error').hidden = false;
}

function clearError() {
  $('error').textContent = '';
  $('error').hidden = true;
}

function setBusy(busy) {
  $('send').disabled = busy;
  $('prompt').disabled = busy;
}

function showCredits(response) {
  const remaining = response.headers.get('X-Credits-Remaining');
  const charged = response.headers.get('X-Credits-Charged');
  if (remaining !== null) $('balance').textContent = remaining;
  if (charged !== null) $('charged').textContent = charged;
}

// signInURL accepts only an http(s) Location from the gateway.
function signInURL(location) {
  try {
    const u = new URL(location, config.gateway_url);
    return u.protocol === 'https:' || u.protocol === 'http:' ? u.href : null;
  } catch {
    return null;
  }
}

async function send(event) {
  event.preventDefault();
  const text = $('prompt').value.trim();
  if (!text) return;
  clearError();
  setBusy(true);
  try {
    await chat(text);
  } finally {
    setBusy(false);
    $('prompt').focus();
  }
}

async function chat(text) {
  const messages = conversation.concat([{ role: 'user', content: text }]);
  const headers = {
    'Content-Type': 'application/json',
    // Where the gateway's sign-in sends the browser back to (API.md §5).
    'Redirect': location.pathname,
  };
  const jwt = token();
  if (jwt) headers['Authorization'] = jwt; // the raw JWT, as the Peerwave seed sends it

  let response, body;
  try {
    response = await fetch(config.gateway_url + '/v1/chat/completions', {
      method: 'POST',
      headers,
      body: JSON.stringify({ model: config.model, messages, stream: false }),
      credentials: 'omit',
      cache: 'no-store',
    });
    body = await response.json().catch(() => null);
  } catch (err) {
    showError('The gateway cannot be reached: ' + err.message);
    return;
  }
  const message = body?.error?.message || `HTTP ${response.status}`;

  if (response.ok) {
    const content = body?.choices?.[0]?.message?.content;
    if (typeof content !== 'string') {
      showError('The gateway answered without a message.');
      return;
    }
    conversation = messages.concat([{ role: 'assistant', content }]);
    saveConversation();
    render();
    showCredits(response);
    $('prompt').value = '';
    return;
  }

  if (response.status === 402) {
    const target = signInURL(response.headers.get('Location'));
    if (target) {
      // Out of credits: sign in (the gateway comes back here with #token=...). The prompt is
      // kept to be sent again.
      sessionStorage.setItem(PENDING_KEY, text);
      showError('Out of credits: signing in…');
      window.location.assign(target);
      return;
    }
  }

  if (response.status === 401 && jwt) {
    sessionStorage.removeItem(TOKEN_KEY);
    showStatus();
    showError('Your sign-in is no longer valid (' + message + '); send again to chat anonymously.');
    return;
  }

  showError(message);
}

function forget() {
  sessionStorage.removeItem(TOKEN_KEY);
  $('balance').textContent = '–';
  $('charged').textContent = '–';
  clearError();
  showStatus();
}

takeFragment();
showStatus();
render();
const pending = sessionStorage.getItem(PENDING_KEY);
if (pending !== null) {
  sessionStorage.removeItem(PENDING_KEY);
  $('prompt').value = pending;
}
$('chat').addEventListener('submit', send);
$('forget').addEventListener('click', forget);
