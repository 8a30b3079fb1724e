"""`RabbitMqQueue`: the `JobQueue` port on RabbitMQ with `pika.BlockingConnection`.

Queues (all durable):

* ``<queue>`` -- the jobs; declared plainly (``durable=True``, no ``x-`` arguments) so that the seed
  client's ``assertQueue(queue, {durable: true})`` declares the very same queue.
* ``<queue>.dead`` -- dead letters, fed by explicit publishes of the original body, unchanged (so
  it can be requeued as it came), with the reason in the ``x-flowcraft-reason`` header. A reason
  quotes the job, which an attacker may make huge: AMQP headers travel in one frame (``frame_max``,
  128 KB by default), and a larger one makes RabbitMQ close the connection at every attempt. So the
  header holds at most `MAX_REASON_BYTES` of UTF-8 (a longer reason is cut, ending with
  ``... [reason cut: N bytes in all]``, its full length also in ``x-flowcraft-reason-bytes``), and
  control characters (NUL included) and unencodable surrogates are escaped (``\\x00``). The full
  reason is in the worker's log.
* ``<queue>.delay`` -- delayed jobs: each message carries its delay as a per-message
  ``expiration``; when it expires RabbitMQ dead-letters it (``x-dead-letter-exchange: ""``,
  ``x-dead-letter-routing-key: <queue>``) into the main queue. RabbitMQ only expires messages at the
  head of a queue, so a short delay queued behind a longer one waits for the longer one: a job is
  never early, but with mixed delays it can be late by up to the longest delay ahead of it. That is
  acceptable for sleeps and retry backoff (durations in the same run are usually alike); use one
  delay queue per rounded delay if you need tighter timers.

Routing (SPEC 14): a job whose `queue` names another queue N goes to the durable queue N (declared
plainly, as the main one, with its own delay queue ``N.delay`` dead-lettering into it); dead
letters of every queue go to ``<queue>.dead``. A worker serving several `queues` consumes from each
on its one channel (one prefetch window), and `fetch` hands out what it holds in the order of
`queues`.

Messages are persistent (``delivery_mode=2``) and published with publisher confirms (and
``mandatory``), so `enqueue` returns only once RabbitMQ has them; several messages go as one AMQP
transaction (`tx.commit-ok` comes once RabbitMQ has them all), their frames written in one `send`.
Deliveries are acknowledged manually, after the commit (the core calls `ack`): the oldest ones
acknowledged together as one `multiple` ack. A consumer holds up to `prefetch` deliveries
(`DEFAULT_PREFETCH`; the window is the channel's, a global `basic.qos`, so that `set_prefetch`
changes it at once); `fetch` returns what has arrived, without waiting for more once it has one.
Publishing and consuming use two connections
(a `BlockingConnection` is not thread-safe, and a client thread may publish while the worker thread
consumes), each behind its own lock. A dropped connection is re-opened with capped exponential
backoff; deliveries unacknowledged on the old channel are redelivered by RabbitMQ by itself, and
acks for them are dropped (their delivery tags belong to the closed channel).
"""
from __future__ import annotations

import collections
import copy
import hashlib
import logging
import random
import threading
import time
import uuid
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import pika
import pika.exceptions

from flowcraft.operations import DeadLetter
from flowcraft.ports import Delivery, Job, MalformedJob, WorkerInfo

logger = logging.getLogger("flowcraft.rabbitmq.queue")

REASON_HEADER = "x-flowcraft-reason"
REASON_BYTES_HEADER = "x-flowcraft-reason-bytes"  # the full reason's UTF-8 length, when the header is cut
MAX_REASON_BYTES = 4096  # UTF-8 bytes of a reason in its header: far below any frame_max
_AMQP_ERRORS = (pika.exceptions.AMQPError, ConnectionError, OSError)
# Refusals of the credentials (or of the vhost): retrying them cannot help at the first connection.
_AUTH_ERRORS = (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError,
                pika.exceptions.ProbableAccessDeniedError)
_IDLE_AFTER = 0.05  # seconds without deliveries before `on_idle` is called
# Unacknowledged deliveries a consumer may hold. The worker handles what it holds as one batch (a
# wave per run): 40 lets it hold the next wave while it commits one, which measured 1.4-1.6x the
# node executions/s of 10 on the 20x20 chain benchmark. Lower it for slow node code, where a
# worker holding many jobs keeps them from idle workers.
DEFAULT_PREFETCH = 40


def _header_text(reason: Any) -> Tuple[str, Optional[int]]:
    """The reason as a header may hold it: control characters and lone surrogates escaped, at most
    `MAX_REASON_BYTES` of UTF-8; and the full reason's length when it had to be cut (else None)."""
    text = str(reason)
    if not text.isprintable():  # NUL, newlines and other control characters, as repr writes them
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    raw = text.encode("utf-8", "backslashreplace")  # a lone surrogate cannot be UTF-8
    if len(raw) <= MAX_REASON_BYTES:
        return raw.decode("utf-8"), None
    marker = f"... [reason cut: {len(raw)} bytes in all]"
    return raw[:MAX_REASON_BYTES - len(marker)].decode("utf-8", "ignore") + marker, len(raw)


def _parameters(connection_or_url: Any) -> pika.connection.Parameters:
    if isinstance(connection_or_url, str):
        return pika.URLParameters(connection_or_url)
    if isinstance(connection_or_url, pika.connection.Parameters):
        return connection_or_url
    return connection_or_url._impl.params  # a ready BlockingConnection: reuse its parameters


def _coalesce_output(connection: Any) -> None:
    """Join the frames pika has buffered into one chunk: it sends every chunk with its own
    `send()`, three per message, and RabbitMQ then handles every segment on its own. Measured here
    on a 20-message transaction: half the wall time, half the client CPU and a third less broker CPU
    per message. Relies on pika 1.x internals; does nothing if they are not there."""
    transport = getattr(getattr(connection, "_impl", None), "_transport", None)
    buffers = getattr(transport, "_tx_buffers", None)
    if isinstance(buffers, collections.deque) and len(buffers) > 1:
        joined = b"".join(buffers)
        buffers.clear()
        buffers.append(joined)


class _Link:
    """One connection + channel, re-opened with backoff when it drops."""

    def __init__(self, params: pika.connection.Parameters, setup: Callable[[Any], None], name: str,
                 connection: Any = None, reconnect_timeout: float = 60.0, max_backoff: float = 1.0) -> None:
        self.params = params
        self.setup = setup
        self.name = name
        self.reconnect_timeout = reconnect_timeout
        self.max_backoff = max_backoff
        self.lock = threading.RLock()
        self.connection: Any = connection
        self.channel: Any = None
        self.generation = 0
        self.closed_on_purpose = False  # the channel was closed by us (`release`): reopening it is no recovery

    def ensure(self, first: bool = False) -> Any:
        """The open channel, (re)connecting with backoff; `first`: a refused login raises at once
        (later, during a broker restart, it is retried like any outage)."""
        if self.channel is not None and self.channel.is_open and self.connection.is_open:
            return self.channel
        deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.05
        while True:
            try:
                if self.connection is None or not self.connection.is_open:
                    self.connection = pika.BlockingConnection(self.params)
                self.channel = self.connection.channel()
                self.generation += 1
                self.setup(self.channel)
                if self.generation > 1 and not self.closed_on_purpose:
                    logger.warning("RabbitMQ %s connection re-opened", self.name)
                self.closed_on_purpose = False
                return self.channel
            except _AMQP_ERRORS as error:
                self.drop()
                if first and isinstance(error, _AUTH_ERRORS):
                    raise
                if time.monotonic() + delay > deadline:
                    raise ConnectionError(f"RabbitMQ unreachable for {self.reconnect_timeout:g}s: {error!r}") from error
                wait = delay * random.uniform(0.5, 1.0)  # jittered: a fleet of workers does not retry in step
                logger.warning("RabbitMQ unreachable (%r); retrying in %.2fs", error, wait)
                time.sleep(wait)
                delay = min(delay * 2, self.max_backoff)

    def drop(self) -> None:
        """Forget the current connection (closing it if it still looks open)."""
        channel, connection = self.channel, self.connection
        self.channel = None
        self.connection = None
        for thing in (channel, connection):
            try:
                if thing is not None and thing.is_open:
                    thing.close()
            except Exception:
                pass

    def close(self) -> None:
        with self.lock:
            self.drop()


def _queue_in(body: Any) -> Optional[str]:
    """The `queue` a serialized job names (None: the default queue); only a body that holds the
    field's name is parsed."""
    if (b'"queue"' not in body) if isinstance(body, (bytes, bytearray)) else ('"queue"' not in body):
        return None
    try:
        return Job.from_json(body).queue
    except MalformedJob:
        return None


class RabbitMqQueue:
    """The job queue on RabbitMQ; see the module docstring."""

    def __init__(self, connection_or_url: Any, queue_name: str = "flowcraft-jobs", prefetch: int = DEFAULT_PREFETCH, *,
                 reconnect_timeout: float = 60.0, max_backoff: float = 1.0, queues: Optional[Sequence[str]] = None) -> None:
        problem = self.queue_name_problem(queue_name)
        if problem:
            raise ValueError(f"invalid queue name {queue_name!r}: {problem}")
        if queues is not None and (isinstance(queues, str) or not queues):
            raise ValueError(f"queues must be a non-empty list of queue names, not {queues!r}")
        for name in queues or ():
            problem = self.queue_name_problem(name)
            if problem:
                raise ValueError(f"invalid queue name {name!r}: {problem}")
        self.queue_name = queue_name
        self.queues: Tuple[str, ...] = tuple(dict.fromkeys(queues or (queue_name,)))
        # the other queues this process published to (or serves): declared with every new channel
        self._routed: Set[str] = {q for q in self.queues if q != queue_name}
        self.dead_queue = f"{queue_name}.dead"
        self.delay_queue = f"{queue_name}.delay"
        self.prefetch = max(1, int(prefetch))
        params = _parameters(connection_or_url)
        given = None if isinstance(connection_or_url, (str, pika.connection.Parameters)) else connection_or_url
        self._publisher = _Link(params, self._setup_publisher, "publisher", None, reconnect_timeout, max_backoff)
        self._consumer = _Link(params, self._setup_consumer, "consumer", given, reconnect_timeout, max_backoff)
        # (generation, method, body, index in `queues` of the queue it came from)
        self._buffer: Deque[Tuple[int, Any, Any, int]] = collections.deque()
        self._unacked: Deque[int] = collections.deque()  # delivery tags of the consumer channel not yet acked, in order
        self._consumer_tag: Optional[str] = None
        self._tx: Optional[Tuple[int, Any]] = None  # (publisher generation, transactional channel)
        self._returned: List[bytes] = []
        self._plain_props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        # Called (in `fetch`, by the consuming thread) once no delivery came for a moment.
        self.on_idle: Optional[Callable[[], None]] = None
        self._is_lane = False  # made by `lane()`: `close()` closes its consumer only
        with self._publisher.lock:
            self._publisher.ensure(first=True)  # declares the queues; fails fast on a bad URL or login

    def lane(self) -> "RabbitMqQueue":
        """The same queue for another worker thread: a consumer channel on a connection of its
        own (its deliveries, prefetch window and acknowledgements are its own), publishing
        through this queue's publisher connection (shared, behind its lock)."""
        other = copy.copy(self)
        link = self._consumer
        other._consumer = _Link(link.params, other._setup_consumer, "consumer", None, link.reconnect_timeout,
                                link.max_backoff)
        other._buffer = collections.deque()
        other._unacked = collections.deque()
        other._consumer_tag = None
        other._tx = None
        other._returned = []
        other.on_idle = None
        other._is_lane = True
        return other

    def hold(self, count: int, commits_take: bool = True) -> None:
        """The worker's next fetch asks for `count` jobs (with those it holds unacknowledged):
        the prefetch window (`set_prefetch`). Commits take no jobs here (`commits_take` is moot)."""
        self.set_prefetch(count)

    def set_prefetch(self, count: int) -> None:
        """Hold at most `count` unacknowledged deliveries from now on (`basic.qos` on the consumer
        channel when it changes; deliveries already held stay held until acknowledged). The limit
        is the channel's (``global``: its one consumer's): RabbitMQ applies a per-consumer
        ``basic.qos`` to consumers started after it only, so the window would stay as it was."""
        count = max(1, int(count))
        if count == self.prefetch:
            return
        link = self._consumer
        with link.lock:
            self.prefetch = count
            channel = link.channel
            if channel is None or not channel.is_open:
                return  # the next channel is set up with it
            try:
                channel.basic_qos(prefetch_count=count, global_qos=True)
            except _AMQP_ERRORS as error:
                logger.warning("basic.qos failed (%r): reconnecting", error)
                link.drop()

    def close_consumer(self) -> None:
        """Close the consumer connection only (a worker thread's lane; the publisher is shared)."""
        self._consumer.close()
        self._buffer.clear()

    # --- topology --------------------------------------------------------------------------------

    @staticmethod
    def queue_name_problem(name: Any) -> Optional[str]:
        """Why RabbitMQ cannot take `name` as a queue of ours (None: it can)."""
        if not isinstance(name, str) or not name:
            return "a queue name is a non-empty string"
        if len(name.encode()) > 240:
            return "longer than 240 bytes (RabbitMQ takes 255, with room for '.delay')"
        if name.startswith("amq."):
            return "names starting with 'amq.' are RabbitMQ's own"
        return None

    def _declare(self, channel: Any) -> None:
        channel.queue_declare(self.queue_name, durable=True)
        channel.queue_declare(self.dead_queue, durable=True)
        channel.queue_declare(self.delay_queue, durable=True, arguments={
            "x-dead-letter-exchange": "", "x-dead-letter-routing-key": self.queue_name})
        for name in sorted(self._routed):
            self._declare_routed(channel, name)

    @staticmethod
    def _declare_routed(channel: Any, name: str) -> None:
        channel.queue_declare(name, durable=True)
        channel.queue_declare(f"{name}.delay", durable=True, arguments={
            "x-dead-letter-exchange": "", "x-dead-letter-routing-key": name})

    def _known(self, names: Iterable[Optional[str]]) -> None:
        """Declare the routed queues not declared yet (on the publisher channel: every channel
        opened later declares them with the others)."""
        new = {n for n in names if n is not None and n != self.queue_name and n not in self._routed}
        if not new:
            return
        with self._publisher.lock:
            channel = self._publisher.ensure()
            for name in sorted(new):
                self._declare_routed(channel, name)
                self._routed.add(name)

    def _setup_publisher(self, channel: Any) -> None:
        self._declare(channel)
        channel.confirm_delivery()

    def _setup_consumer(self, channel: Any) -> None:
        self._declare(channel)
        channel.basic_qos(prefetch_count=self.prefetch, global_qos=True)
        generation = self._consumer.generation
        self._buffer.clear()  # deliveries of a closed channel come back by themselves
        self._unacked.clear()

        def consume(index: int) -> Callable[..., None]:
            def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
                self._buffer.append((generation, method, body, index))
                self._unacked.append(method.delivery_tag)
            return on_message

        for index, name in enumerate(self.queues):
            self._consumer_tag = channel.basic_consume(name, consume(index), auto_ack=False)

    # --- publishing ------------------------------------------------------------------------------

    def _publish(self, messages: Sequence[Tuple[str, bytes, pika.BasicProperties]]) -> None:
        """Publish (routing key, body, properties) messages with confirms; reconnect and republish
        what was not confirmed when the connection drops (duplicates are fine: at-least-once)."""
        if len(messages) > 1:
            return self._publish_batch(messages)
        link = self._publisher
        with link.lock:
            done = 0
            failures = 0
            while done < len(messages):
                channel = link.ensure()
                try:
                    while done < len(messages):
                        key, body, props = messages[done]
                        channel.basic_publish("", key, body, properties=props, mandatory=True)
                        done += 1
                except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as error:
                    failures += 1
                    if failures > 5:
                        raise ConnectionError(f"RabbitMQ refused a message for {messages[done][0]!r}: {error!r}") from error
                    link.drop()  # re-declare the queues and try again
                except _AMQP_ERRORS as error:
                    logger.warning("publishing to RabbitMQ failed (%r): reconnecting", error)
                    link.drop()

    def _publish_batch(self, messages: Sequence[Tuple[str, bytes, pika.BasicProperties]]) -> None:
        """Several messages in one AMQP transaction: `tx.commit-ok` comes once RabbitMQ has them
        all (as a confirm would for one), so a batch costs one round trip instead of one each.
        Messages returned as unroutable (a queue deleted meanwhile) are re-declared and re-sent."""
        link = self._publisher
        with link.lock:
            todo = list(messages)
            failures = 0
            while todo:
                try:
                    channel = self._tx_channel(link)
                    returned: List[bytes] = []
                    self._returned = returned
                    for key, body, props in todo:
                        # the underlying channel's publish only buffers the frames: `tx_commit`
                        # sends them all at once (the blocking one would flush every message)
                        channel._impl.basic_publish("", key, body, properties=props, mandatory=True)
                    _coalesce_output(link.connection)
                    channel.tx_commit()
                    link.connection.process_data_events(time_limit=0)  # dispatch basic.return frames
                    todo = [m for m in todo if m[1] in returned]
                    if todo:
                        failures += 1
                        if failures > 5:
                            raise ConnectionError(f"RabbitMQ returned {len(todo)} message(s) for {todo[0][0]!r} as unroutable")
                        link.drop()  # re-declare the queues and send the returned ones again
                except _AMQP_ERRORS as error:
                    if isinstance(error, ConnectionError) and failures > 5:
                        raise
                    logger.warning("publishing a batch to RabbitMQ failed (%r): reconnecting", error)
                    link.drop()

    def _tx_channel(self, link: _Link) -> Any:
        """The publisher connection's transactional channel (opened once per connection)."""
        link.ensure()
        tx = self._tx
        if tx is None or tx[0] != link.generation or not tx[1].is_open:
            channel = link.connection.channel()
            channel.tx_select()
            channel.add_on_return_callback(lambda ch, method, props, body: self._returned.append(body))
            self._tx = tx = (link.generation, channel)
        return tx[1]

    def enqueue(self, jobs: Sequence[Job], delay: float = 0.0) -> None:
        self._send([(job.to_json(), delay, job.queue) for job in jobs])

    def enqueue_serialized(self, messages: Sequence[Tuple[Any, float]]) -> None:
        """Publish jobs already serialized (as `Job.to_json` writes them, str or bytes), each with its
        delay in seconds, all in one batch (one AMQP transaction when there are several); each goes
        to the queue its `queue` field names (only a body holding that field is parsed)."""
        self._send([(body, delay, _queue_in(body)) for body, delay in messages])

    def _send(self, messages: Sequence[Tuple[Any, float, Optional[str]]]) -> None:
        self._known(queue for _, _, queue in messages)
        out = []
        for body, delay, queue in messages:
            name = queue or self.queue_name
            if delay > 0:
                props = pika.BasicProperties(delivery_mode=2, content_type="application/json",
                                             expiration=str(max(1, int(round(delay * 1000)))))
                key = f"{name}.delay"
            else:
                props = self._plain_props
                key = name
            out.append((key, body.encode() if isinstance(body, str) else body, props))
        if out:
            self._publish(out)

    def publish_raw(self, body: bytes, queue: Optional[str] = None) -> None:
        """Publish a raw message to the main queue (or `queue`), as a foreign (or broken) client would."""
        self._known([queue])
        self._publish([(queue or self.queue_name, body, pika.BasicProperties(delivery_mode=2))])

    # --- consuming -------------------------------------------------------------------------------

    def _pending_in_broker(self, channel: Any) -> int:
        return sum(channel.queue_declare(name, passive=True).method.message_count for name in self.queues)

    def fetch(self, max_jobs: int = 1, timeout: float = 1.0) -> List[Delivery]:
        link = self._consumer
        with link.lock:
            deadline = time.monotonic() + max(0.0, timeout)
            idle = False
            while True:
                try:
                    channel = link.ensure()
                    link.connection.process_data_events(time_limit=0)
                    if not self._buffer:
                        remaining = deadline - time.monotonic()
                        if remaining > 0:
                            # a short first wait: between two batches nothing is idle yet
                            wait = min(remaining, 1.0 if idle or self.on_idle is None else _IDLE_AFTER)
                            link.connection.process_data_events(time_limit=wait)
                            if not self._buffer and not idle:
                                idle = True
                                self._idle()
                            if not self._buffer and time.monotonic() < deadline:
                                continue
                        elif timeout <= 0:
                            # burst mode: messages ready but not pushed to us yet, or pushed while
                            # the declare's reply came (a small prefetch window: the broker pushes
                            # the next one once our last ack reached it)
                            pending = self._pending_in_broker(channel)
                            link.connection.process_data_events(time_limit=0)
                            if pending and not self._buffer:
                                link.connection.process_data_events(time_limit=0.2)
                    if self._buffer:
                        # several queues: all that arrived, so that the first queue's go first
                        self._gather(link, max_jobs if len(self.queues) == 1 else max(max_jobs, self.prefetch))
                    break
                except _AMQP_ERRORS as error:
                    logger.warning("consuming from RabbitMQ failed (%r): reconnecting", error)
                    link.drop()
                    if time.monotonic() >= deadline:
                        return []
            if len(self.queues) > 1 and len(self._buffer) > 1:  # the first queue's first (a stable sort)
                self._buffer = collections.deque(sorted(self._buffer, key=lambda entry: entry[3]))
            out: List[Delivery] = []
            while self._buffer and len(out) < max_jobs:
                generation, method, body, _ = self._buffer.popleft()
                out.append(Delivery.parse(body, tag=(generation, method.delivery_tag), redelivered=method.redelivered))
            return out

    def _idle(self) -> None:
        """Nothing came for `_IDLE_AFTER` seconds: let the owner catch up (see `on_idle`)."""
        try:
            if self.on_idle is not None:
                self.on_idle()
        except Exception as error:  # for instance PostgreSQL down: the worker loop finds out by itself
            logger.warning("on_idle failed: %r", error)

    def _gather(self, link: _Link, max_jobs: int) -> None:
        """Deliveries arrive one after the other, and pika returns with the first: take in those
        that are on the socket already, so that a batch is as full as it gets without waiting
        (waiting for more, even 0.5 ms, measured slower)."""
        while len(self._buffer) < max_jobs:
            before = len(self._buffer)
            link.connection.process_data_events(time_limit=0)
            if len(self._buffer) == before:
                return

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge deliveries of the current consumer channel (those of a closed one are
        redelivered by RabbitMQ, and the core drops them). The longest run of the oldest
        unacknowledged deliveries goes as one `multiple` ack; any others one by one."""
        link = self._consumer
        with link.lock:
            tags = {d.tag[1] for d in deliveries if d.tag[0] == link.generation}
            if not tags or link.channel is None:
                return
            unacked = self._unacked
            upto = None
            while unacked and unacked[0] in tags:
                upto = unacked.popleft()
                tags.discard(upto)
            try:
                if upto is not None:
                    link.channel.basic_ack(upto, multiple=True)
                for tag in sorted(tags):
                    if tag in unacked:  # never twice: RabbitMQ closes the channel on an unknown tag
                        unacked.remove(tag)
                        link.channel.basic_ack(tag)
            except _AMQP_ERRORS as error:
                logger.warning("ack failed (%r); the jobs will be redelivered and dropped", error)
                link.drop()

    def give_back(self, deliveries: Sequence[Delivery]) -> None:
        """Deliveries this consumer will not start (its batch turned out slow): its prefetch
        window is shrunk to one first (it holds the rest of its batch, so RabbitMQ pushes it no
        more), then they are rejected with requeue, for other consumers to take."""
        self.set_prefetch(1)
        link = self._consumer
        with link.lock:
            tags = [d.tag[1] for d in deliveries if d.tag[0] == link.generation and d.tag[1] in self._unacked]
            if not tags or link.channel is None:
                return
            try:
                for tag in tags:
                    self._unacked.remove(tag)
                    link.channel.basic_nack(tag, multiple=False, requeue=True)
            except _AMQP_ERRORS as error:
                logger.warning("giving deliveries back failed (%r); they will be redelivered", error)
                link.drop()

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Publish the delivery's body unchanged to the dead-letter queue with the reason in a
        bounded header (see the module docstring), then acknowledge it."""
        text, full_length = _header_text(reason)
        headers: Dict[str, Any] = {REASON_HEADER: text}
        if full_length is not None:
            headers[REASON_BYTES_HEADER] = full_length
        props = pika.BasicProperties(delivery_mode=2, headers=headers, message_id=uuid.uuid4().hex,
                                     timestamp=int(time.time()))
        self._publish([(self.dead_queue, delivery.body, props)])
        self.ack([delivery])

    # --- dead letters (SPEC 11) ------------------------------------------------------------------
    # Read without losing any: on a channel of their own, `basic_get` (no auto-ack) takes the
    # dead letters one by one, and closing that channel gives every one not acknowledged back to
    # the queue (RabbitMQ requeues a closed channel's unacknowledged messages), so a crash in the
    # middle loses nothing either. While one is being read, others see the letters it holds as
    # absent. A letter's id is its `message_id` (set when it was dead-lettered), else the SHA-1 of
    # its body and reason (letters from older versions).

    def _with_dead(self, visit: Callable[[Any, Any, Any, bytes], bool]) -> None:
        """Call `visit(channel, method, properties, body)` on each dead letter (at most as many as
        the queue held at the start) until it returns False; then give back those not acked."""
        link = self._publisher
        with link.lock:
            link.ensure()
            channel = link.connection.channel()
            try:
                count = channel.queue_declare(self.dead_queue, passive=True).method.message_count
                for _ in range(count):
                    method, properties, body = channel.basic_get(self.dead_queue, auto_ack=False)
                    if method is None or not visit(channel, method, properties, body):
                        break
            finally:
                try:
                    channel.close()  # the letters not acknowledged go back to the queue
                except _AMQP_ERRORS:
                    link.drop()

    @staticmethod
    def _letter(properties: Any, body: bytes) -> DeadLetter:
        headers = properties.headers or {}
        reason = headers.get(REASON_HEADER, "")
        reason = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
        letter_id = properties.message_id or hashlib.sha1(body + b"\0" + reason.encode("utf-8", "replace")).hexdigest()
        return DeadLetter(letter_id, bytes(body), reason, Delivery.parse(body, None).run_id_hint(),
                          float(properties.timestamp or 0))

    def list_dead_letters(self, limit: Optional[int] = 100) -> List[DeadLetter]:
        """The dead letters, oldest first (at most `limit`; None: all); none is lost (see above)."""
        out: List[DeadLetter] = []

        def visit(channel: Any, method: Any, properties: Any, body: bytes) -> bool:
            out.append(self._letter(properties, body))
            return limit is None or len(out) < limit

        self._with_dead(visit)
        return out

    def remove_dead_letter(self, dead_letter_id: str, publish: bool = True, queue: Optional[str] = None) -> bool:
        """Take the dead letter `dead_letter_id` out; with `publish`, its body goes to the main
        queue (or `queue`) first (confirmed), then the letter is acknowledged (a crash between: the
        job is there twice, which workers tolerate). False if no dead letter has that id."""
        found: List[bool] = []
        self._known([queue])

        def visit(channel: Any, method: Any, properties: Any, body: bytes) -> bool:
            if self._letter(properties, body).id != dead_letter_id:
                return True
            if publish:
                self._publish([(queue or self.queue_name, bytes(body), self._plain_props)])
            channel.basic_ack(method.delivery_tag)
            found.append(True)
            return False

        self._with_dead(visit)
        return bool(found)

    def purge_dead_letters(self) -> int:
        with self._publisher.lock:
            channel = self._publisher.ensure()
            return int(channel.queue_purge(self.dead_queue).method.message_count)

    def release(self) -> None:
        """Give back the deliveries prefetched but not handed out, so a stopped worker holds none:
        closing the consumer channel makes RabbitMQ requeue everything it left unacknowledged."""
        link = self._consumer
        with link.lock:
            self._buffer.clear()
            self._unacked.clear()
            channel, link.channel = link.channel, None
            link.closed_on_purpose = channel is not None
            try:
                if channel is not None and channel.is_open:
                    channel.close()
            except _AMQP_ERRORS:
                pass

    def close(self) -> None:
        """Close the connections; a worker thread's queue (`lane()`) closes its consumer only (the
        publisher is shared)."""
        if self._is_lane:
            return self.close_consumer()
        self._consumer.close()
        self._publisher.close()
        self._buffer.clear()

    # --- inspection (tests, tools) ---------------------------------------------------------------

    def depth(self, queue: Optional[str] = None) -> int:
        """Messages ready in the main queue, or `queue` (not delayed, not unacknowledged): its depth."""
        self._known([queue])
        with self._publisher.lock:
            channel = self._publisher.ensure()
            return int(channel.queue_declare(queue or self.queue_name, passive=True).method.message_count)

    def live_workers(self, queues: Sequence[str] = ()) -> List[WorkerInfo]:
        """One entry per consumer of the main queue, of the queues this process knows and of
        `queues`: the broker counts them but names none (a worker serving several queues is one
        consumer of each)."""
        self._known(queues)
        names = [self.queue_name, *sorted(self._routed)]
        with self._publisher.lock:
            channel = self._publisher.ensure()
            counts = [(name, int(channel.queue_declare(name, passive=True).method.consumer_count)) for name in names]
        return [WorkerInfo(f"consumer {i} of {name}" if name != self.queue_name else f"consumer {i}", name, None,
                           "AMQP consumer (the broker names no worker)", (name,))
                for name, count in counts for i in range(1, count + 1)]

    def message_counts(self) -> Tuple[int, int, int]:
        """(ready in the main queue, in the delay queue, in the dead-letter queue)."""
        with self._publisher.lock:
            channel = self._publisher.ensure()
            return tuple(channel.queue_declare(q, passive=True).method.message_count
                         for q in (self.queue_name, self.delay_queue, self.dead_queue))
