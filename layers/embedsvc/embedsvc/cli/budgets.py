"""`embedsvc budgets set|show|clear`: task (lifetime) and tenant (per UTC month) budgets the ledger enforces."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from embedsvc.services.budgets import Scope


def _owner(args: argparse.Namespace) -> tuple[Scope, str]:
    return ("task", args.task) if args.task is not None else ("tenant", args.tenant)


def _print(budget, scope: str, key: str, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(budget.as_dict() if budget else {"scope": scope, "key": key, "budget": None}))
        return
    if budget is None:
        print(f"{scope} {key}: no budget")
        return
    month = f" ({budget.period})" if budget.period else ""
    print(f"{scope} budget {key}{month}{'  EXHAUSTED' if budget.exhausted else ''}")
    if budget.limit_usd is not None:
        print(
            f"  dollars: ${budget.spent_usd:.6f} spent of ${budget.limit_usd:.6f}, "
            f"${budget.remaining_usd:.6f} left"
        )
    else:
        print(f"  dollars: ${budget.spent_usd:.6f} spent (no limit)")
    if budget.limit_tokens is not None:
        print(
            f"  tokens:  {budget.spent_tokens:,} spent of {budget.limit_tokens:,}, "
            f"{budget.remaining_tokens:,} left"
        )
    else:
        print(f"  tokens:  {budget.spent_tokens:,} spent (no limit)")


def cmd_budgets_set(args: argparse.Namespace) -> int:
    """Set a budget's limits (spend so far is kept) and print it."""
    from embedsvc import container

    if args.usd is None and args.tokens is None:
        print("error: give --usd, --tokens, or both", file=sys.stderr)
        return 2
    scope, key = _owner(args)
    store = container.budgets()
    store.set(scope, key, usd=args.usd, tokens=args.tokens)
    _print(store.get(scope, key), scope, key, args.format)
    return 0


def cmd_budgets_show(args: argparse.Namespace) -> int:
    """Print a budget: limits, spend, what is left; exit status 1 when there is none."""
    from embedsvc import container

    scope, key = _owner(args)
    budget = container.budgets().get(scope, key)
    _print(budget, scope, key, args.format)
    return 0 if budget is not None else 1


def cmd_budgets_clear(args: argparse.Namespace) -> int:
    """Remove a budget: the task or tenant is no longer capped."""
    from embedsvc import container

    scope, key = _owner(args)
    container.budgets().clear(scope, key)
    print(f"cleared the {scope} budget {key}", file=sys.stderr)
    return 0


def _add_owner(parser: argparse.ArgumentParser) -> None:
    owner = parser.add_mutually_exclusive_group(required=True)
    owner.add_argument(
        "--task", metavar="ID", help="a task (backfill, migration, import): its lifetime budget"
    )
    owner.add_argument("--tenant", metavar="ID", help="a tenant: its budget per UTC calendar month")
    parser.add_argument(
        "--format", choices=("table", "json"), default="table", help="output (default: table)"
    )


def add_budgets_parser(commands: Any) -> None:
    """Register `budgets set`, `budgets show` and `budgets clear` on the CLI's subparsers."""
    budgets = commands.add_parser(
        "budgets",
        help="task and tenant budgets in dollars or tokens; the ledger refuses work that would pass one",
        description=(
            "A task's budget counts for its lifetime, a tenant's per UTC calendar month. Every metered "
            "provider request charged to a budget is refused (HTTP 429 budget_exceeded; the worker "
            "dead-letters the message with reason budget_exceeded) once it would pass it."
        ),
    )
    actions = budgets.add_subparsers(dest="budgets_command", required=True, metavar="ACTION")
    set_ = actions.add_parser(
        "set",
        help="set a budget's limits (a limit not given is removed; spend so far is kept)",
        epilog="example: embedsvc budgets set --task reindex-2026-11 --usd 5 --tokens 200000000",
    )
    _add_owner(set_)
    set_.add_argument("--usd", type=float, help="limit in US dollars")
    set_.add_argument("--tokens", type=int, help="limit in tokens")
    set_.set_defaults(func=cmd_budgets_set)
    show = actions.add_parser("show", help="print a budget's limits, spend and what is left")
    _add_owner(show)
    show.set_defaults(func=cmd_budgets_show)
    clear = actions.add_parser("clear", help="remove a budget")
    _add_owner(clear)
    clear.set_defaults(func=cmd_budgets_clear)
