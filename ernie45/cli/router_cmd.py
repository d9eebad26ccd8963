"""`ernie45 router --prefill URL... --decode URL... --mixed URL...`: the OpenAI-compatible front of a
prefill/decode disaggregated deployment (ernie45.router)."""

from __future__ import annotations

import argparse
import logging


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..router.policies import POLICIES

    p.add_argument("--prefill", nargs="*", default=[], metavar="URL", help="prefill instances (serve --role prefill)")
    p.add_argument("--decode", nargs="*", default=[], metavar="URL", help="decode instances (serve --role decode)")
    p.add_argument("--mixed", nargs="*", default=[], metavar="URL", help="mixed instances (plain ernie45 serve)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--policy", default="least_load", choices=POLICIES,
                   help="how an instance of a role is picked (default: least_load)")
    p.add_argument("--health-interval", type=float, default=1.0, help="seconds between health / load checks")
    p.add_argument("--max-attempts", type=int, default=3, help="instances a request may be tried on")
    p.add_argument("--pd-min-prompt-tokens", type=int, default=0, metavar="N",
                   help="prompts estimated shorter than N tokens go straight to a decode instance, which computes "
                        "them itself (default 0: every request that can be split goes through a prefill instance)")
    p.add_argument("--role-switch", action="store_true",
                   help="switch instance roles automatically (rule: ernie45/router/role_switch.py)")
    p.add_argument("--role-switch-ratio", type=float, default=3.0)
    p.add_argument("--role-switch-min-gap", type=float, default=2.0)
    p.add_argument("--role-switch-hold", type=int, default=3, help="consecutive checks the rule must hold")
    p.add_argument("--role-switch-cooldown", type=float, default=20.0)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..router.app import build_router_app
        from ..router.role_switch import RoleSwitchConfig
    except ImportError as exc:
        raise SystemExit(f"error: ernie45 router needs the serving dependencies ({exc.name} is missing): "
                         "pip install 'ernie45[serve]'") from None
    if not (args.prefill or args.decode or args.mixed):
        raise ValueError("give at least one instance: --prefill URL, --decode URL or --mixed URL")
    if args.max_attempts < 1:
        raise ValueError(f"--max-attempts must be >= 1, got {args.max_attempts}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    switch = RoleSwitchConfig(enabled=args.role_switch, ratio=args.role_switch_ratio,
                              min_gap=args.role_switch_min_gap, hold_checks=args.role_switch_hold,
                              cooldown_s=args.role_switch_cooldown)
    app = build_router_app(args.prefill, args.decode, args.mixed, args.policy, args.health_interval, switch,
                           args.max_attempts, args.pd_min_prompt_tokens)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False, log_config=None)
    return 0
