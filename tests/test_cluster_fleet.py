"""The fleet's promise on a multi-node LiveKit cluster (two livekit-server processes sharing one
Redis, tests/harness.py ``LiveKitCluster``), with serve hosts connected to different nodes: a
host that dies has its call taken over by a host on the other node (resumed), hosts on both
nodes racing for a lost room put exactly one agent in it, and a full fleet serves a waiting
room once a slot frees, whichever node each room lives on."""

from __future__ import annotations

import asyncio
import time

import pytest

from harness import tone, wait_until
from test_dispatch import (AGENT, GREETING_HZ, USER_HZ, agents_in, join, leave_all, present, serves,  # noqa: F401
                           session_of, standin)
from test_fleet import FAST, rescued, server_agents

pytestmark = pytest.mark.e2e


async def test_a_host_on_node_0_dies_and_a_host_on_node_1_takes_its_call_over(livekit_cluster, standin, serves,
                                                                                room_name):
    node0, node1 = livekit_cluster.nodes
    victim = serves("victim0", server=node0, standin=standin, **FAST)
    await victim.registered()
    user = await join(node1, room_name, publish=True)  # the user comes through the other node
    try:
        heard = await user.wait_heard(AGENT, 15)
        await standin.wait_for(lambda: session_of(standin, 0) is not None, 15, "the call's session")
        session = session_of(standin, 0)
        survivor = serves("survivor1", server=node1, standin=standin, **FAST)
        await survivor.registered()
        await victim.wait_for_output("Voice Agent session ready", 5)
        await asyncio.sleep(1.0)
        victim.kill()
        t_kill = time.monotonic()
        await wait_until(lambda: AGENT not in user.room.remote_participants, 10, "the dead host's agent to go")
        await wait_until(lambda: AGENT in user.room.remote_participants, 10, "an agent back in the room")
        where = [n.node_id for n in livekit_cluster.nodes].index(livekit_cluster.room_node(room_name))
        print(f"room on node {where}; SIGKILL -> agent back after {time.monotonic() - t_kill:.2f} s")
        await standin.wait_for(lambda: session.resumes >= 1, 10, "the session resumed")
        assert rescued(survivor, room_name) == 1 and not session.ended
        t_back = time.monotonic()
        turns = len(session.replies)
        user.say(tone(USER_HZ, 0.8, amplitude=0.6))
        await standin.wait_for(lambda: len(session.replies) > turns and session.replies[-1].done_at, 15, "a reply")
        await asyncio.sleep(0.5)
        assert present(heard.timeline(GREETING_HZ), t_back - 3, time.monotonic(), 0.1) == 0, "the greeting again"
    finally:
        await user.leave()


async def test_hosts_on_both_nodes_racing_for_a_lost_room_put_exactly_one_agent_in_it(livekit_cluster, serves,
                                                                                      room_name):
    node0, node1 = livekit_cluster.nodes
    user = await join(node0, room_name)
    try:
        await asyncio.sleep(5.0)  # no host: the room's job is lost
        hosts = [serves(f"racer{i}", server=(node0, node1, node1)[i], **FAST) for i in range(3)]
        samples = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 12:
            samples.append((agents_in(user), await server_agents(node1, room_name)))
            await asyncio.sleep(0.1)
        assert max(max(s) for s in samples) == 1, f"two agents in the room: {samples}"
        assert samples[-1] == (1, 1), "no agent in the lost room"
        assert sum(rescued(h, room_name) for h in hosts) == 1
    finally:
        await user.leave()


async def test_a_full_fleet_on_two_nodes_serves_the_waiting_room_once_a_user_leaves(livekit_cluster, serves,
                                                                                   room_name):
    node0, node1 = livekit_cluster.nodes
    hosts = [serves(f"full{i}", server=(node0, node1)[i], MAX_CALLS="1", **FAST) for i in range(2)]
    for h in hosts:
        await h.registered()
    users = []
    try:
        for i in range(2):
            users.append(await join((node1, node0)[i], f"{room_name}-{i}"))
            await wait_until(lambda u=users[-1]: AGENT in u.room.remote_participants, 15, f"the agent in room {i}")
        waiting = await join(node0, f"{room_name}-2")
        users.append(waiting)
        await asyncio.sleep(3.0)
        assert AGENT not in waiting.room.remote_participants
        await users[0].leave()
        t_left = time.monotonic()
        await wait_until(lambda: AGENT in waiting.room.remote_participants, 15, "the agent in the waiting room")
        print(f"user left -> the waiting room served after {time.monotonic() - t_left:.2f} s")
        assert sum(rescued(h, f"{room_name}-2") for h in hosts) == 1
    finally:
        await leave_all(users)
