// A LiveKit agent frontend for tests/test_frontend.py, built the way agent-starter-react is:
// useSession and its start() inside a SessionProvider (with RoomAudioRenderer), and what the
// frontends read from an agent: useAgent (state, failureReasons), useVoiceAssistant (state,
// agentTranscriptions: LiveKit transcription packets) and useSessionMessages (the lk.transcription
// text streams and chat). The page renders them and records them, timestamped, in
// window.__results; it asserts nothing. Bundled by build.mjs (esbuild) into dist/app.js.
//
// Query string: url (ws://...), token, mic ("on": useSession's default start(), which enables the
// microphone and asks for the pre-connect buffer, see `room` below; "off": start() with the
// microphone disabled, so it is never enabled).
import { useEffect, useState } from 'react';
import { createRoot } from 'react-dom/client';
import {
  ParticipantKind,
  ParticipantEvent,
  Room,
  RoomEvent,
  TokenSource,
  setLogExtension,
  LogLevel,
} from 'livekit-client';
import {
  RoomAudioRenderer,
  SessionProvider,
  useAgent,
  useSession,
  useSessionMessages,
  useVoiceAssistant,
} from '@livekit/components-react';

const q = new URLSearchParams(location.search);
const MIC = q.get('mic') === 'off' ? 'off' : 'on';

const t0 = performance.now();
const now = () => Math.round(performance.now() - t0); // ms since the page started
window.__now = () => performance.now() - t0; // lets the test map page time onto its own clock

const MAX_LOG = 300;
const PRE_CONNECT_TOPIC = 'lk.agent.pre-connect-audio-buffer';
const MAX_KEPT_BYTES = 2 << 20;
const R = (window.__results = {
  phase: 'loading',
  mic: MIC,
  errors: [],
  log: [], // livekit-client's own log lines at its levels (warnings and errors): [t, level, message, error]
  identity: null,
  connection: [], // [t, useSession().connectionState] on every change
  sessionStartCalledAt: null,
  sessionStartedAt: null, // session.start() resolved
  getUserMediaAt: null, // the microphone device opened (the fake WAV starts playing from here)
  micPublishedAt: null,
  micTrackSid: null,
  micAudioFeatures: null, // what the publication advertises (TF_PRECONNECT_BUFFER = the pre-connect buffer)
  micSubscribedAt: null, // the agent subscribed to our microphone (this ends the pre-connect recording)
  agentJoinedAt: null, // RoomEvent.ParticipantConnected (or present at connect) of the first kind-AGENT participant
  agentIdentity: null,
  voiceAssistant: { states: [], agent: null, agentSeenAt: null, audioTrackSid: null, transcriptions: {} },
  agent: { states: [], failures: [], failureReasons: null, isConnected: null },
  messages: [], // useSessionMessages().messages now: what the transcript shows
  messageHistory: {}, // every message id ever listed (a segment's id changes with each stream of it)
  transcriptionPackets: [], // RoomEvent.TranscriptionReceived as the room emits it (diagnostics only)
  byteStreams: [], // every byte stream this page sends (the pre-connect buffer is one)
});

const fail = (where, e) => R.errors.push(`${now()} ${where}: ${e && e.stack ? e.stack : e}`);
window.addEventListener('error', (e) => fail('error', e.message));
window.addEventListener('unhandledrejection', (e) => fail('unhandledrejection', e.reason));

setLogExtension((level, msg, context) => {
  if (level < LogLevel.info) return;
  const err = context && context.error ? String(context.error) : null;
  R.log.push([now(), LogLevel[level], String(msg), err]);
  if (R.log.length > MAX_LOG) R.log.splice(0, R.log.length - MAX_LOG);
});

// When the microphone device opens: the fake capture file plays from its start from then on.
const gum = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
navigator.mediaDevices.getUserMedia = async (constraints) => {
  const stream = await gum(constraints);
  if (constraints && constraints.audio && R.getUserMediaAt === null) R.getUserMediaAt = now();
  return stream;
};

// The Room useSession connects (useSession's own would be `new Room({})`). Two options:
// - no echo cancellation, noise suppression or gain control, so the test tone reaches the agent
//   as it is;
// - the pre-connect buffer as a room option. useSession.start() asks for it the starter's way,
//   setMicrophoneEnabled(true, undefined, { preConnectBuffer: true }), but livekit-client 2.23.0's
//   setTrackEnabled reads preConnectBuffer from { ...publishDefaults, ...captureOptions }, not from
//   the publish options, so that request alone records nothing (no TF_PRECONNECT_BUFFER, no
//   byte stream: seen here). With the room option the SDK's own pre-connect path runs as designed:
//   it records the microphone from the moment it opens, and once an agent is active sends the
//   recording to it on lk.agent.pre-connect-audio-buffer, until the agent subscribes.
const room = new Room({
  audioCaptureDefaults: { echoCancellation: false, noiseSuppression: false, autoGainControl: false, channelCount: 1 },
  publishDefaults: { preConnectBuffer: true },
});

// Observe (never alter) the byte streams the SDK sends, e.g. lk.agent.pre-connect-audio-buffer.
const streamBytes = room.localParticipant.streamBytes.bind(room.localParticipant);
room.localParticipant.streamBytes = async (options) => {
  const s = {
    topic: options?.topic ?? null,
    name: options?.name ?? null,
    mimeType: options?.mimeType ?? null,
    destinationIdentities: options?.destinationIdentities ?? null,
    attributes: { ...(options?.attributes || {}) },
    openedAt: now(),
    bytes: 0,
    chunks: 0,
    closedAt: null,
    error: null,
    base64: null, // the pre-connect buffer's bytes, once closed, for the test to decode
  };
  R.byteStreams.push(s);
  const keep = s.topic === PRE_CONNECT_TOPIC ? [] : null;
  let writer;
  try {
    writer = await streamBytes(options);
  } catch (e) {
    s.error = String(e);
    throw e;
  }
  const write = writer.write.bind(writer);
  const close = writer.close.bind(writer);
  writer.write = async (chunk) => {
    s.bytes += chunk.byteLength;
    s.chunks += 1;
    if (keep && s.bytes <= MAX_KEPT_BYTES) keep.push(chunk.slice());
    return write(chunk);
  };
  writer.close = async (...args) => {
    const r = await close(...args);
    s.closedAt = now();
    if (keep) {
      let bin = '';
      for (const c of keep) for (let i = 0; i < c.length; i++) bin += String.fromCharCode(c[i]);
      s.base64 = btoa(bin);
    }
    return r;
  };
  return writer;
};

function noteAgent(p) {
  if (R.agentJoinedAt === null && p.kind === ParticipantKind.AGENT && !p.attributes['lk.publish_on_behalf']) {
    R.agentJoinedAt = now();
    R.agentIdentity = p.identity;
  }
}
room
  .on(RoomEvent.ParticipantConnected, noteAgent)
  .on(RoomEvent.Connected, () => room.remoteParticipants.forEach(noteAgent))
  .on(RoomEvent.TranscriptionReceived, (segments, participant, publication) => {
    if (R.transcriptionPackets.length >= 1000) return;
    R.transcriptionPackets.push({
      t: now(),
      participant: participant ? participant.identity : null,
      trackSid: publication ? publication.trackSid : null,
      segments: segments.map((s) => ({ id: s.id, text: s.text, final: s.final })),
    });
  });
room.localParticipant
  .on(ParticipantEvent.LocalTrackPublished, (pub) => {
    if (pub.source !== 'microphone') return;
    R.micPublishedAt = now();
    R.micTrackSid = pub.trackSid;
    R.micAudioFeatures = pub.trackInfo ? [...(pub.trackInfo.audioFeatures || [])] : null;
  })
  .on(ParticipantEvent.LocalTrackSubscribed, (pub) => {
    if (pub.source === 'microphone' && R.micSubscribedAt === null) R.micSubscribedAt = now();
  });

function pushChange(list, value) {
  const v = JSON.stringify(value);
  if (list.length === 0 || JSON.stringify(list[list.length - 1][1]) !== v) list.push([now(), value]);
}

// --- what the hooks report ------------------------------------------------------------------

function Probe() {
  const va = useVoiceAssistant();
  const agent = useAgent();
  const { messages } = useSessionMessages();

  useEffect(() => pushChange(R.voiceAssistant.states, va.state), [va.state]);
  useEffect(() => {
    R.voiceAssistant.agent = va.agent ? va.agent.identity : null;
    if (va.agent && R.voiceAssistant.agentSeenAt === null) R.voiceAssistant.agentSeenAt = now();
  }, [va.agent]);
  useEffect(() => {
    R.voiceAssistant.audioTrackSid = va.audioTrack?.publication?.trackSid ?? null;
  }, [va.audioTrack]);
  useEffect(() => {
    const seen = R.voiceAssistant.transcriptions;
    for (const s of va.agentTranscriptions) {
      const e = (seen[s.id] ??= { id: s.id, text: null, final: null, firstAt: now(), updates: 0, finalAt: null });
      if (e.text !== s.text || e.final !== s.final) {
        e.text = s.text;
        e.final = s.final;
        e.updates += 1;
        e.lastAt = now();
        if (s.final && e.finalAt === null) e.finalAt = now();
      }
    }
  }, [va.agentTranscriptions]);

  useEffect(() => {
    pushChange(R.agent.states, agent.state);
    R.agent.isConnected = agent.isConnected;
  }, [agent.state, agent.isConnected]);
  useEffect(() => {
    R.agent.failureReasons = agent.failureReasons;
    pushChange(R.agent.failures, agent.failureReasons ?? []);
  }, [agent.failureReasons]);

  useEffect(() => {
    R.messages = messages.map((m) => {
      const e = {
        id: m.id,
        type: m.type ?? 'chatMessage',
        from: m.from ? m.from.identity : null,
        text: m.message,
        attributes: { ...(m.attributes || {}) },
      };
      R.messageHistory[m.id] ??= { ...e, at: now() };
      return e;
    });
  }, [messages]);

  const transcript = messages.map((m) => (
    <li key={m.id} data-type={m.type ?? 'chatMessage'}>
      {m.from ? m.from.identity : '?'}: {m.message}
    </li>
  ));
  return (
    <div>
      <p id="va-state">useVoiceAssistant().state: {va.state}</p>
      <p id="agent-state">useAgent().state: {agent.state}</p>
      {agent.failureReasons && agent.failureReasons.length > 0 && (
        <p id="agent-error">agent error: {agent.failureReasons.join('; ')}</p>
      )}
      <p>agentTranscriptions: {va.agentTranscriptions.map((s) => s.text).join(' | ')}</p>
      <ul id="messages">{transcript}</ul>
    </div>
  );
}

// --- the app: useSession as agent-starter-react uses it ---------------------------------------

const tokenSource = TokenSource.literal({ serverUrl: q.get('url'), participantToken: q.get('token') });

function App() {
  const session = useSession(tokenSource, { room });
  const [started, setStarted] = useState(false);

  useEffect(() => pushChange(R.connection, session.connectionState), [session.connectionState]);

  useEffect(() => {
    if (started) return;
    setStarted(true);
    R.phase = 'starting';
    R.sessionStartCalledAt = now();
    // agent-starter-react calls start() with no options: microphone on, pre-connect buffer on.
    const options = MIC === 'off' ? { tracks: { microphone: { enabled: false } } } : undefined;
    session
      .start(options)
      .then(() => {
        R.sessionStartedAt = now();
        R.identity = room.localParticipant.identity;
        R.phase = 'connected';
      })
      .catch((e) => {
        fail('session.start', e);
        R.phase = 'failed';
      });
  }, [started, session]);

  return (
    <SessionProvider session={session}>
      <p id="phase">mic {MIC}; connection: {session.connectionState}</p>
      <Probe />
      <RoomAudioRenderer />
    </SessionProvider>
  );
}

if (!q.get('url') || !q.get('token')) {
  fail('main', 'the page needs ?url=ws://...&token=...');
  R.phase = 'failed';
} else {
  createRoot(document.getElementById('root')).render(<App />);
}
