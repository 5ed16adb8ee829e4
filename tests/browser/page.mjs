// A user in a real browser, for tests/test_browser.py. Query string: url (ws://...), token,
// agent (identity, default voice-agent), freqs (comma-separated Hz to measure in the agent's audio).
// Everything observed goes into window.__results, which the test polls; nothing is asserted here.
import { ParticipantKind, Room, RoomEvent, Track } from 'livekit-client';

const q = new URLSearchParams(location.search);
const AGENT = q.get('agent') || 'voice-agent';
const FREQS = (q.get('freqs') || '300').split(',').map(Number);
const WINDOW = 4096; // samples per analysis window (85 ms at 48 kHz)
const EVERY_MS = 40; // analysis cadence: windows overlap
const MAX_WINDOWS = 4000;

const t0 = performance.now();
const now = () => Math.round(performance.now() - t0); // ms since the page started
window.__now = () => performance.now() - t0; // lets the test map page time to its own clock

const R = (window.__results = {
  phase: 'starting',
  errors: [],
  identity: null,
  micTrackSid: null,
  connectionState: null,
  participants: {}, // identity -> what this page knows about each remote participant
  agent: null, // identity of "the agent" by the frontends' rule (first kind AGENT, not lk.publish_on_behalf)
  audio: { freqs: FREQS, subscribedAt: null, trackSid: null, element: null, context: null, windows: [] },
  captions: [], // one entry per lk.transcription text stream
});

const status = (s) => {
  R.phase = s;
  document.getElementById('status').textContent = s;
};
const fail = (where, e) => R.errors.push(`${where}: ${e && e.stack ? e.stack : e}`);
window.addEventListener('error', (e) => fail('error', e.message));
window.addEventListener('unhandledrejection', (e) => fail('unhandledrejection', e.reason));

// Every RTCPeerConnection the SDK makes, so the test can ask which candidate pair ICE chose.
const pcs = [];
const NativePC = window.RTCPeerConnection;
window.RTCPeerConnection = class extends NativePC {
  constructor(...args) {
    super(...args);
    pcs.push(this);
  }
};

window.__ice = async () => {
  const out = [];
  for (const pc of pcs) {
    const stats = await pc.getStats();
    const byId = new Map();
    stats.forEach((s) => byId.set(s.id, s));
    const cand = (id) => {
      const c = byId.get(id);
      return c && { address: c.address, port: c.port, protocol: c.protocol, type: c.candidateType };
    };
    const local = [];
    stats.forEach((s) => s.type === 'local-candidate' && local.push(cand(s.id)));
    let selected = null;
    stats.forEach((s) => {
      if (s.type === 'transport' && s.selectedCandidatePairId) {
        const p = byId.get(s.selectedCandidatePairId);
        selected = p && { local: cand(p.localCandidateId), remote: cand(p.remoteCandidateId), state: p.state };
      }
    });
    out.push({ connectionState: pc.connectionState, iceConnectionState: pc.iceConnectionState, selected, local });
  }
  return out;
};

// --- the agent's audio, measured: a Hann-windowed single DFT bin per frequency --------------

function measure(track) {
  // Chromium only pulls a remote WebRTC track that a media element plays; attach() makes one.
  const el = track.attach();
  el.id = 'agent-audio';
  document.body.appendChild(el);
  el.play().catch((e) => fail('audio element play', e));
  const ctx = new AudioContext({ sampleRate: 48000 });
  ctx.resume().catch((e) => fail('AudioContext.resume', e));
  const source = ctx.createMediaStreamSource(new MediaStream([track.mediaStreamTrack]));
  const analyser = ctx.createAnalyser();
  analyser.fftSize = WINDOW;
  const mute = ctx.createGain();
  mute.gain.value = 0; // keep the graph pulled without playing it twice
  source.connect(analyser).connect(mute).connect(ctx.destination);

  const hann = Float32Array.from({ length: WINDOW }, (_, n) => 0.5 - 0.5 * Math.cos((2 * Math.PI * n) / (WINDOW - 1)));
  const hannSum = hann.reduce((a, b) => a + b, 0);
  const tables = FREQS.map((f) => {
    const c = new Float32Array(WINDOW);
    const s = new Float32Array(WINDOW);
    for (let n = 0; n < WINDOW; n++) {
      c[n] = hann[n] * Math.cos((2 * Math.PI * f * n) / ctx.sampleRate);
      s[n] = hann[n] * Math.sin((2 * Math.PI * f * n) / ctx.sampleRate);
    }
    return [c, s];
  });
  const buf = new Float32Array(WINDOW);
  R.audio.subscribedAt = now();
  setInterval(() => {
    R.audio.context = { state: ctx.state, sampleRate: ctx.sampleRate, currentTime: ctx.currentTime };
    R.audio.element = { paused: el.paused, muted: el.muted, readyState: el.readyState, currentTime: el.currentTime };
    if (ctx.state !== 'running') return;
    analyser.getFloatTimeDomainData(buf);
    let energy = 0;
    for (let n = 0; n < WINDOW; n++) energy += buf[n] * buf[n];
    const amps = tables.map(([c, s]) => {
      let re = 0;
      let im = 0;
      for (let n = 0; n < WINDOW; n++) {
        re += buf[n] * c[n];
        im += buf[n] * s[n];
      }
      return Math.round((2 * Math.hypot(re, im) / hannSum) * 1e5) / 1e5;
    });
    const w = R.audio.windows;
    w.push([now(), Math.round(Math.sqrt(energy / WINDOW) * 1e5) / 1e5, ...amps]); // [t ms, rms, amp per freq]
    if (w.length > MAX_WINDOWS) w.splice(0, w.length - MAX_WINDOWS);
  }, EVERY_MS);
}

// --- participants, as a frontend sees them ------------------------------------------------

function note(p) {
  const e = (R.participants[p.identity] ??= { identity: p.identity, states: [], tracks: {} });
  e.kind = p.kind;
  e.isAgent = p.kind === ParticipantKind.AGENT;
  e.attributes = { ...p.attributes };
  const state = p.attributes['lk.agent.state'];
  if (state !== undefined && e.states.at(-1)?.[1] !== state) e.states.push([now(), state]);
  for (const pub of p.trackPublications.values()) {
    e.tracks[pub.trackSid] = { kind: pub.kind, source: pub.source, subscribed: pub.isSubscribed };
  }
  if (!R.agent) {
    const agent = [...room.remoteParticipants.values()].find(
      (x) => x.kind === ParticipantKind.AGENT && !x.attributes['lk.publish_on_behalf']);
    R.agent = agent ? agent.identity : null;
  }
}

// --- captions: lk.transcription text streams --------------------------------------------

async function caption(reader, from) {
  const c = {
    id: reader.info.id,
    topic: reader.info.topic,
    sender: from.identity,
    attributesAtOpen: { ...(reader.info.attributes || {}) },
    attributes: null,
    text: '',
    chunks: 0,
    openedAt: now(),
    closedAt: null,
    error: null,
  };
  R.captions.push(c);
  try {
    for await (const chunk of reader) {
      c.text += chunk;
      c.chunks += 1;
    }
  } catch (e) {
    c.error = String(e);
  }
  c.attributes = { ...(reader.info.attributes || {}) }; // with the trailer's attributes merged
  c.closedAt = now();
}

// --- the call ------------------------------------------------------------------------------

const room = new Room({ adaptiveStream: false, dynacast: false, webAudioMix: false });
room.registerTextStreamHandler('lk.transcription', (reader, from) => caption(reader, from));
room
  .on(RoomEvent.ParticipantConnected, note)
  .on(RoomEvent.ParticipantAttributesChanged, (_changed, p) => p !== room.localParticipant && note(p))
  .on(RoomEvent.TrackPublished, (_pub, p) => note(p))
  .on(RoomEvent.ConnectionStateChanged, (s) => (R.connectionState = s))
  .on(RoomEvent.TrackSubscribed, (track, pub, p) => {
    note(p);
    if (p.identity === AGENT && track.kind === Track.Kind.Audio && !R.audio.trackSid) {
      R.audio.trackSid = pub.trackSid;
      measure(track);
    }
  });

async function main() {
  const url = q.get('url');
  const token = q.get('token');
  if (!url || !token) throw new Error('the page needs ?url=ws://...&token=...');
  status('connecting');
  await room.connect(url, token, { autoSubscribe: true });
  R.identity = room.localParticipant.identity;
  for (const p of room.remoteParticipants.values()) note(p);
  status('publishing');
  // A test tone must reach the agent as it is: no echo cancellation, noise suppression or AGC.
  const pub = await room.localParticipant.setMicrophoneEnabled(true, {
    echoCancellation: false,
    noiseSuppression: false,
    autoGainControl: false,
    channelCount: 1,
  });
  R.micTrackSid = pub ? pub.trackSid : null;
  status('joined');
}

main().catch((e) => {
  fail('main', e);
  status('failed');
});
