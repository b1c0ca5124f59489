"""The process-wide client loop and connection pools that every VM shares: a VM's close cancels
only its own work, a forked child gets a loop of its own, and idle clients are bounded."""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import threading
import time

import pytest

import parrot as P
from parrot.client import SharedClients
from parrot.loop_thread import LoopStoppedError, LoopThread, shared_loop
from tests.sdk.test_sdk_service import endless, write_code


def test_ending_a_lease_cancels_its_own_work_and_leaves_the_loop_running():
    owner = LoopThread("test-leases")
    try:
        first, second = owner.lease(), owner.lease()
        started = threading.Event()

        async def forever() -> None:
            started.set()
            await asyncio.sleep(3600)

        errors: list[BaseException] = []

        def wait_on_first() -> None:
            try:
                first.run_sync(forever())
            except BaseException as exc:  # noqa: BLE001 - the test reads it
                errors.append(exc)

        waiter = threading.Thread(target=wait_on_first)
        waiter.start()
        assert started.wait(5)
        first.stop()
        waiter.join(5)
        assert not waiter.is_alive() and isinstance(errors[0], LoopStoppedError)
        with pytest.raises(LoopStoppedError):
            first.run_sync(asyncio.sleep(0))
        assert second.run_sync(asyncio.sleep(0, result=42)) == 42  # the loop goes on
        assert not owner.loop.is_closed()
    finally:
        owner.stop()


def _child(conn) -> None:
    conn.send(shared_loop().run_sync(asyncio.sleep(0, result="child")))


def test_a_forked_child_gets_a_client_loop_of_its_own():
    parent = shared_loop()
    assert shared_loop() is parent and parent.run_sync(asyncio.sleep(0, result=1)) == 1
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_child, args=(theirs,))
    child.start()
    try:
        assert ours.poll(30), "the child hung on its parent's loop thread"
        assert ours.recv() == "child"
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()


async def test_idle_clients_are_bounded_and_clients_in_use_stay_open():
    pool = SharedClients(max_idle=2)
    a = await pool.acquire("http://127.0.0.1:1", api_key=None, timeout=5)
    assert await pool.acquire("http://127.0.0.1:1/", api_key=None, timeout=5) is a  # same service
    assert await pool.acquire("http://127.0.0.1:1", api_key="k", timeout=5) is not a  # other settings
    others = [await pool.acquire(f"http://127.0.0.1:{p}", api_key=None, timeout=5) for p in (2, 3, 4)]
    for client in others:
        await pool.release(client)
    assert [c._http.is_closed for c in others] == [True, False, False]  # the least recently used went
    assert not a._http.is_closed  # held by two users
    await pool.release(a)
    await pool.release(a)
    assert not a._http.is_closed  # idle, among the most recent


def test_vms_share_one_client_and_closing_one_leaves_the_other_working(service_url):
    failed: list[BaseException] = []
    with P.Parrot(service_url) as second:
        with P.Parrot(service_url) as first:
            assert first._client is second._client and first.session_id != second.session_id
            essay = endless("parrots")  # runs until its session ends

            def wait_for_the_essay() -> None:
                try:
                    essay.get()
                except BaseException as exc:  # noqa: BLE001 - the test reads it
                    failed.append(exc)

            waiter = threading.Thread(target=wait_for_the_essay)
            waiter.start()
            time.sleep(0.2)  # its long-poll is in flight
        waiter.join(10)  # closing `first` ended the wait: its session went, or the VM stopped its poll
        assert not waiter.is_alive() and isinstance(failed[0], P.ParrotError)
        assert re.search("closed|deleted", str(failed[0]))
        assert isinstance(write_code("a snake game").get(), str)  # `second` goes on
    assert not second._client._http.is_closed  # kept for the next session
