#!/usr/bin/env python3
"""Submit one taskhost job straight onto RabbitMQ, as another system would.

taskhost's ingress for other systems is the durable queue ``<prefix>.submit``,
bound to the direct exchange ``<prefix>.submit`` with routing key ``submit``
(see README.md, "Submitting over RabbitMQ"). The scheduler consumes that queue,
records the job in Postgres and dispatches it to a worker.

The message body is the same JSON as ``POST /api/v1/jobs/submit`` plus
``userId``. Its AMQP properties matter:

* ``content_type=application/json`` and ``type=job.submit.v1``;
* ``message_id`` = a fresh UUID: it becomes the job id and is the idempotency
  key, so re-publishing the same message (e.g. after a lost confirm) does not
  run the job twice;
* ``delivery_mode=2``: persistent.

Publisher confirms are on and the publish is ``mandatory``: if the broker
cannot route the message (no taskhost has declared the topology under that
prefix yet) or refuses it, this script fails instead of losing the job.

Usage::

    pip install -r examples/requirements.txt
    python3 examples/publish_job.py --user alice --command 'echo hello'
    python3 examples/publish_job.py --user alice --command 'uname -a' \\
        --group prod --role web --priority 7 --timeout 120

Environment: ``AMQP_URL`` (default ``amqp://guest:guest@127.0.0.1:5672/%2f``)
and ``TASKHOST_PREFIX`` (default ``taskhost``, the server's
``TASKHOST__AMQP__PREFIX``).

The job id is printed alone on one line on stdout; follow it with
``GET /api/v1/jobs/<jobId>`` or ``taskhost results``.

A confirmed publish only means the broker has the message: taskhost may
still refuse it (an unknown ``userId``, an invalid body), and then it goes to
``<prefix>.dead`` with the reason in the ``x-taskhost-reason`` header. So
before publishing, the script binds a private queue to ``<prefix>.dead`` and
to the job's events on ``<prefix>.events`` and waits (``--wait``, default
10 s) for the verdict. Exit codes:

* 0: taskhost accepted the job (its ``job.*`` or ``change.jobs.insert``
  event was seen);
* 1: taskhost refused it (the reason is printed);
* 2: it could not be published at all;
* 3: published, but no verdict within ``--wait`` seconds (``--wait 0``
  does not wait): check with ``GET /api/v1/jobs/<jobId>`` (404 means it was
  not accepted) or look in ``<prefix>.dead``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid

import pika
from pika.exceptions import (AMQPError, ChannelClosedByBroker, NackError,
                             UnroutableError)

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"
DEFAULT_PREFIX = "taskhost"
MODES = ("pool", "background", "inline")


def build_body(args: argparse.Namespace) -> dict:
    """The job as taskhost expects it: camelCase, optional fields omitted."""
    body: dict = {
        "userId": args.user,
        "jobName": args.name or args.command[:60],
        "command": args.command,
        "executionMode": args.mode,
        "timeoutSeconds": args.timeout,
    }
    if args.description:
        body["description"] = args.description
    if args.priority is not None:
        body["priority"] = args.priority
    target = {
        key: value
        for key, value in (
            ("nodeGroup", args.group),
            ("nodeRole", args.role),
            ("nodeId", args.node_id),
            ("fanout", args.fanout),
        )
        if value is not None
    }
    if target:
        body["target"] = target
    if args.env:
        body["env"] = dict(args.env)
    return body


def watch(channel, prefix: str) -> str:
    """A private queue that sees dead letters and job events; its name."""
    queue = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
    channel.queue_bind(queue, f"{prefix}.dead")
    for key in ("job.#", "change.jobs.insert"):
        channel.queue_bind(queue, f"{prefix}.events", routing_key=key)
    return queue


def verdict(channel, queue: str, job_id: str, wait: float) -> tuple[str, str]:
    """("accepted" | "refused" | "unknown", detail) for the job, within wait s."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            channel.connection.sleep(0.05)
            continue
        if method.exchange.endswith(".dead"):
            if props.message_id == job_id:
                headers = props.headers or {}
                reason = headers.get("x-taskhost-reason", "no reason given")
                if isinstance(reason, bytes):
                    reason = reason.decode("utf-8", "replace")
                return "refused", str(reason)
            continue
        if job_id.encode() in body:
            return "accepted", method.routing_key
    return "unknown", ""


def publish(amqp_url: str, prefix: str, body: dict, job_id: str,
            priority: int | None, wait: float) -> tuple[str, str]:
    """Publish one persistent, confirmed, mandatory message (raise on
    failure), then wait up to ``wait`` seconds for taskhost's verdict."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        queue = watch(channel, prefix) if wait > 0 else ""
        # Every basic_publish now waits for the broker's ack and raises
        # NackError / UnroutableError instead of silently dropping the job.
        channel.confirm_delivery()
        channel.basic_publish(
            exchange=f"{prefix}.submit",
            routing_key="submit",
            body=json.dumps(body, separators=(",", ":")).encode("utf-8"),
            properties=pika.BasicProperties(
                content_type="application/json",
                type="job.submit.v1",
                message_id=job_id,
                delivery_mode=pika.DeliveryMode.Persistent,  # = 2
                priority=priority,
            ),
            mandatory=True,
        )
        if wait <= 0:
            return "unknown", ""
        return verdict(channel, queue, job_id, wait)
    finally:
        if connection.is_open:
            connection.close()


def env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def priority_arg(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 9:
        raise argparse.ArgumentTypeError("priority must be 0-9")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Publish one job to taskhost's RabbitMQ ingress queue "
                    "(<prefix>.submit) and print its job id.",
    )
    parser.add_argument("--user", required=True,
                        help="userId that owns the job (sees its results)")
    parser.add_argument("--command", required=True,
                        help="shell command to run on a worker")
    parser.add_argument("--name",
                        help="jobName (default: the command, cut to 60 chars)")
    parser.add_argument("--description", help="free-text description")
    parser.add_argument("--mode", choices=MODES, default="pool",
                        help="executionMode (default: pool)")
    parser.add_argument("--timeout", type=positive_int, default=60,
                        help="timeoutSeconds (default: 60)")
    parser.add_argument("--group", help="target.nodeGroup")
    parser.add_argument("--role", help="target.nodeRole")
    parser.add_argument("--node-id", help="target.nodeId (one node's UUID)")
    parser.add_argument("--fanout", choices=("one", "all"),
                        help="target.fanout: one matching node, or all of them")
    parser.add_argument("--priority", type=priority_arg,
                        help="0 (lowest) to 9 (highest)")
    parser.add_argument("--env", type=env_pair, action="append",
                        metavar="NAME=VALUE",
                        help="environment variable for the command (repeatable)")
    parser.add_argument("--amqp-url",
                        default=os.environ.get("AMQP_URL", DEFAULT_AMQP_URL),
                        help="broker URL (env AMQP_URL)")
    parser.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                        help="how long to wait for taskhost to accept or refuse "
                             "the job (default 10; 0: do not wait)")
    parser.add_argument("--prefix",
                        default=os.environ.get("TASKHOST_PREFIX", DEFAULT_PREFIX),
                        help="exchange/queue prefix (env TASKHOST_PREFIX)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    job_id = str(uuid.uuid4())  # the job id and idempotency key
    body = build_body(args)
    try:
        outcome, detail = publish(args.amqp_url, args.prefix, body, job_id,
                                  args.priority, args.wait)
    except UnroutableError:
        print(f"error: {args.prefix}.submit did not route the message; is "
              f"taskhost running with prefix {args.prefix!r}?", file=sys.stderr)
        return 2
    except ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            print(f"error: no exchange {args.prefix}.submit on the broker; is "
                  f"taskhost running with prefix {args.prefix!r}?", file=sys.stderr)
        else:
            print(f"error: broker closed the channel: {exc!r}", file=sys.stderr)
        return 2
    except NackError:
        print("error: the broker refused the message (nack)", file=sys.stderr)
        return 2
    except AMQPError as exc:
        print(f"error: AMQP: {exc!r}", file=sys.stderr)
        return 2
    print(job_id)
    if outcome == "accepted":
        return 0
    if outcome == "refused":
        print(f"error: taskhost refused the job: {detail}", file=sys.stderr)
        return 1
    if args.wait > 0:
        print(f"published, but taskhost said nothing within {args.wait:g} s; "
              f"check GET /api/v1/jobs/{job_id} (404: not accepted) or the "
              f"queue {args.prefix}.dead", file=sys.stderr)
    else:
        print(f"published (not waiting for the verdict); check GET "
              f"/api/v1/jobs/{job_id}", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
