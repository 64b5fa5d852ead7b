"""``upstreamproxy doctor``: probe each installed tool through the relay (see bootstrap/doctor.py).

``--url`` (https:// or http://) and, optionally, ``--http-url`` (a plain-HTTP URL probed
in the same run): each installed tool is probed against each URL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.parse
from dataclasses import asdict

from ..bootstrap.doctor import TOOLS, ProbeResult, Verdict, diagnose, no_proxy_match
from ..bootstrap.hardening import HardeningError, is_dumpable
from ..bootstrap.state import NoSession, default_state_dir, load_session, session_env
from ..options import add_option, add_state_dir_option

HELP = "check that each installed tool reaches a URL through the running relay"


def configure(parser: argparse.ArgumentParser) -> None:
    add_option(
        parser,
        "--url",
        "DOCTOR_URL",
        "https:// (or http://) URL to probe; pick one the session's policy allows",
    )
    add_option(
        parser,
        "--http-url",
        "DOCTOR_HTTP_URL",
        "also probe this http:// URL (plain-HTTP forwarding), e.g. http://deb.debian.org/",
    )
    add_state_dir_option(parser, "state directory of the session")
    add_option(
        parser, "--tools", "DOCTOR_TOOLS", "comma-separated tools to probe", default=",".join(TOOLS)
    )
    add_option(
        parser, "--timeout", "DOCTOR_TIMEOUT", "seconds allowed per tool", default=20.0, type=float
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def _fail(message: str, code: int = 2) -> int:
    print(f"upstreamproxy doctor: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    tools = [t.strip() for t in str(args.tools).split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown or not tools:
        return _fail(
            f"unknown tool(s) {', '.join(unknown) or '(none)'}; choose from {','.join(TOOLS)}"
        )
    if not args.url:
        return _fail(
            "give the URL to probe: --url https://HOST/ (one the session's policy "
            "allows), or UPSTREAMPROXY_DOCTOR_URL"
        )
    urls = [args.url, *([args.http_url] if args.http_url else [])]
    for index, url in enumerate(urls):
        parts = urllib.parse.urlsplit(url)
        allowed = ("https", "http") if index == 0 else ("http",)
        if parts.scheme not in allowed or not parts.hostname:
            flag = (
                "--url must be an https:// or http://"
                if index == 0
                else "--http-url must be an http://"
            )
            return _fail(f"{flag} URL")
    try:
        loaded = load_session(args.state_dir or default_state_dir(), check_relay=True)
    except NoSession as exc:  # not a usage error: env and exec say 1 too
        return _fail(exc.reason, 1)
    _, env = session_env(loaded, os.environ)
    for url in urls:
        if no_proxy_match(url, env):
            return _fail(
                f"{urllib.parse.urlsplit(url).hostname} matches NO_PROXY, so tools reach it "
                "directly by design; probe a URL outside NO_PROXY"
            )
    if any(url.startswith("http:") for url in urls) and not loaded.info.plain_http:
        return _fail("this session does not proxy plain HTTP (start --no-http-proxy)", 1)
    runs = [
        (url, asyncio.run(diagnose(loaded, url, tools, os.environ, per_tool_timeout=args.timeout)))
        for url in urls
    ]
    if args.json:
        document: dict[str, object] = {
            "url": runs[0][0],
            "relay": loaded.info.proxy_url,
            "pid": loaded.info.pid,
            "results": [asdict(r) for r in runs[0][1]],
        }
        if len(runs) > 1:
            document["http_url"] = runs[1][0]
            document["http_results"] = [asdict(r) for r in runs[1][1]]
        print(json.dumps(document, indent=2))
    else:
        for url, results in runs:
            _print_report(
                url, loaded.info.proxy_url, loaded.info.pid, loaded.info.ca_bundle, results
            )
    return 0 if all(r.ok for _, results in runs for r in results) else 1


def _print_report(url: str, relay: str, pid: int, bundle: str, results: list[ProbeResult]) -> None:
    try:
        dumpable = "no" if not is_dumpable(pid) else "YES (hardening failed)"
    except HardeningError as exc:
        dumpable = f"unknown ({exc})"
    print(f"upstreamproxy doctor: {url}")
    print(f"  relay {relay} (pid {pid}, dumpable: {dumpable}), CA bundle {bundle}")
    width = max(len(v.value) for v in Verdict)
    for result in results:
        version = f" [{result.version}]" if result.version else ""
        print(f"  {result.tool:<7} {result.verdict.value:<{width}} {result.detail}{version}")
        if result.fix:
            print(f"  {'':<7} {'':<{width}} fix: {result.fix}")
    reached = sum(r.verdict is Verdict.REACHED for r in results)
    installed = sum(r.verdict is not Verdict.NOT_INSTALLED for r in results)
    print(f"{reached} of {installed} installed tools reached {url}")
