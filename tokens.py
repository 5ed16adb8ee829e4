"""LiveKit credentials: access tokens (the agent's, a user's for `python worker.py token`,
an operator's for `control`) and the server API client."""

from __future__ import annotations

import base64
import datetime
import json
from typing import Any

from config import Config
from exits import EXIT_OK


def mint_token(cfg: Config, identity: str, *, kind: str | None = None, name: str | None = None,
               ttl: datetime.timedelta = datetime.timedelta(hours=6), sources: tuple[str, ...] | None = None,
               update_own_metadata: bool = True, attributes: dict[str, str] | None = None) -> str:
    """A token to join the configured room. ``sources``: the only track sources it may
    publish (LiveKit's lower-case TrackSource names, e.g. "microphone"); None: any.
    ``ttl`` only limits when it can be used to join: the server refreshes the token of a
    participant that is in the room."""
    from livekit import api

    grants = api.VideoGrants(room_join=True, room=cfg.room_name, can_publish=True, can_subscribe=True,
                             can_publish_data=True)
    if sources is not None:
        grants.can_publish_sources = list(sources)
    if update_own_metadata:
        grants.can_update_own_metadata = True
    token = (
        api.AccessToken(cfg.livekit_api_key, cfg.livekit_api_secret)
        .with_identity(identity)
        .with_name(name or identity)
        .with_grants(grants)
        .with_ttl(ttl)
    )
    if kind:
        token = token.with_kind(kind)
    if attributes:
        token = token.with_attributes(attributes)
    return token.to_jwt()


# `python worker.py token`: a user's token is handed around (pasted into a browser, sent in
# chat), so it is short-lived and publishes a microphone only (no camera, no screen share),
# with data (the frontends' chat) and no metadata changes. The agent's own token is
# mint_token's default.
USER_TOKEN_TTL = datetime.timedelta(hours=1)
USER_TOKEN_TTL_MIN = datetime.timedelta(minutes=1)
USER_TOKEN_TTL_MAX = datetime.timedelta(hours=24)
USER_TOKEN_SOURCES = ("microphone",)


def duration_text(d: datetime.timedelta) -> str:
    seconds = int(d.total_seconds())
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    return f"{seconds // 60} min" if seconds % 60 == 0 else f"{seconds} s"


def parse_ttl(text: str) -> datetime.timedelta:
    """--ttl: "90s", "30m", "2h", "1h30m". Raises ValueError with the one line to print."""
    import re

    m = re.fullmatch(r"\s*(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s)?\s*", text.lower())
    if not text.strip() or m is None or not any(m.groups()):
        raise ValueError(f"--ttl must be a duration such as 30m, 2h or 1h30m, got {text.strip()[:20]!r}")
    h, mi, se = (int(g or 0) for g in m.groups())
    ttl = datetime.timedelta(hours=h, minutes=mi, seconds=se)
    if not USER_TOKEN_TTL_MIN <= ttl <= USER_TOKEN_TTL_MAX:
        raise ValueError(f"--ttl must be between {duration_text(USER_TOKEN_TTL_MIN)} and "
                         f"{duration_text(USER_TOKEN_TTL_MAX)}, got {text.strip()[:20]!r}")
    return ttl


def server_api(cfg: Config) -> Any:
    """LiveKit's server API (rooms, participants) for the configured server."""
    from livekit import api

    http_url = cfg.livekit_url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
    return api.LiveKitAPI(http_url, cfg.livekit_api_key, cfg.livekit_api_secret)




def print_token(cfg: Config, identity: str, ttl: datetime.timedelta = USER_TOKEN_TTL) -> int:
    """What a person needs to join the agent's room from a browser."""
    token = mint_token(cfg, identity, ttl=ttl, sources=USER_TOKEN_SOURCES, update_own_metadata=False)
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    expires = datetime.datetime.fromtimestamp(claims["exp"], datetime.timezone.utc)
    url = cfg.livekit_url
    print(f"""LiveKit URL:  {url}
Room:         {cfg.room_name}
Identity:     {identity}
Token:        {token}
Join by:      {expires:%Y-%m-%d %H:%M:%S} UTC ({duration_text(ttl)}; --ttl to choose, {duration_text(USER_TOKEN_TTL_MIN)} \
to {duration_text(USER_TOKEN_TTL_MAX)}). A call already joined is not cut off when it expires.
Allows:       joining room {cfg.room_name}, publishing a microphone (no camera or screen share), chat.

Agents Playground (https://agents-playground.livekit.io): choose "Manual", paste the URL and the token.
meet.livekit.io: open "Custom", paste the URL and the token.
Or open: https://meet.livekit.io/custom?liveKitUrl={url}&token={token}
Both also try to publish a camera, which this token refuses: the microphone still works.""")
    return EXIT_OK
