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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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


def publish(amqp_url: str, prefix: str, body: dict, job_id: str,
            priority: int | None) -> None:
    """Publish one persistent, confirmed, mandatory message; raise on failure."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
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
    parser.add_argument("--prefix",
                        default=os.environ.get("TASKHOST_PREFIX", DEFAULT_PREFIX),
                        help="exchange/queue prefix (env TASKHOST_PREFIX)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    job_id = str(uuid.uuid4())  # the job id and idempotency key
    body = build_body(args)
    try:
        publish(args.amqp_url, args.prefix, body, job_id, args.priority)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
