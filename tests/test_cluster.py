"""The two-node livekit-server cluster of the fleet tests is a real one: two server processes
sharing one Redis (tests/harness.py ``LiveKitCluster``, the ``livekit_cluster`` fixture).
Each room lives on one node; participants and agent workers connect to any node, and
signalling, media routing and job requests cross between them."""

from __future__ import annotations

import signal
import time

import pytest

from harness import LiveKitCluster, RoomUser, tone, wait_until
from test_dispatch import AGENT, JOIN_BOUND_S, ServeProcess, agents_in, children_of, join, serve_env

pytestmark = pytest.mark.e2e


async def test_the_cluster_is_two_nodes_in_one_redis(livekit_cluster: LiveKitCluster):
    ids = [n.node_id for n in livekit_cluster.nodes]
    assert None not in ids and len(set(ids)) == 2, ids
    assert livekit_cluster.node_ids() == sorted(ids)
    assert len({n.port for n in livekit_cluster.nodes}) == 2


async def test_participants_joining_via_different_nodes_see_and_hear_each_other(livekit_cluster, room_name):
    node0, node1 = livekit_cluster.nodes
    a = await RoomUser(node0, room_name, "via-node0").join(publish=True)
    b = None
    try:
        # The room is placed on one node when it is created, whichever node the user came through.
        host = livekit_cluster.room_node(room_name)
        assert host in (node0.node_id, node1.node_id), host
        b = await RoomUser(node1, room_name, "via-node1").join(publish=True)
        await wait_until(lambda: "via-node1" in a.room.remote_participants, 10, "node 0's user to see node 1's")
        assert "via-node0" in b.room.remote_participants
        # One of the two is signalled by a node that does not host the room: media still flows.
        a.say(tone(450.0, 1.0))
        await b.wait_heard("via-node0", timeout=10)
        print(f"room {room_name} lives on node {[node0.node_id, node1.node_id].index(host)}")
    finally:
        for u in (b, a):
            if u is not None:
                await u.leave()


async def test_a_serve_process_at_node_1_gets_the_job_for_rooms_created_at_node_0(livekit_cluster, tmp_path,
                                                                                room_name):
    node0, node1 = livekit_cluster.nodes
    tag = "cluster-serve"
    serve = ServeProcess(serve_env(node1, tag), tmp_path / tag).start()
    users: list[RoomUser] = []
    try:
        await serve.registered()
        placed = []
        # A few rooms, so that (most likely) both a room hosted by node 0 and one by node 1 are tried.
        for i in range(4):
            room = f"{room_name[:50]}-{i}"
            t0 = time.monotonic()
            u = await join(node0, room, f"user-{i}")
            users.append(u)
            await wait_until(lambda: AGENT in u.room.remote_participants, JOIN_BOUND_S, f"the agent in {room}")
            assert agents_in(u) == 1 and serve.accepted(room) == 1
            host = livekit_cluster.room_node(room)
            placed.append([node0.node_id, node1.node_id].index(host))
            print(f"room {i}: hosted by node {placed[-1]}, agent in {time.monotonic() - t0:.2f} s")
        assert len(children_of(tag)) == 4
    finally:
        for u in users:
            await u.leave()
        # SIGTERM twice (drain, then end the calls), as the test_dispatch fixture does.
        serve.signal(signal.SIGTERM)
        time.sleep(0.3)
        serve.signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while (serve.alive or children_of(tag)) and time.monotonic() < deadline:
            time.sleep(0.1)
        serve.kill()
    assert not children_of(tag), "a call process outlived its serve process"
    assert "Traceback" not in serve.output()
