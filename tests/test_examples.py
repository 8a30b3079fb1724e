"""The examples under `examples/` run, and do what their printed summaries claim.

Each example's `main()` is called in-process and its returned `WorkflowResult`(s) are checked;
the quick start is also run as a script, exactly as the README tells a new user to.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

from flowcraft import FlowRuntime, WorkflowBlueprint

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # so `examples` imports as a package, as the CLI's --app does

SCRIPTS = sorted(p.stem for p in EXAMPLES.glob("*.py") if p.stem != "__init__")


def example(name: str):
    return importlib.import_module(f"examples.{name}")


def test_every_example_is_a_script_with_main():
    assert {"quickstart", "order_pipeline", "fan_out_fan_in", "loop", "batch", "subflow", "approval",
            "order_app"} <= set(SCRIPTS)
    for name in SCRIPTS:
        source = (EXAMPLES / f"{name}.py").read_text()
        assert callable(getattr(example(name), "main", None)), name
        assert 'if __name__ == "__main__":\n    main()' in source, name


def test_quickstart_runs_as_a_script():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "examples/quickstart.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "order A-1001: completed" in proc.stdout
    assert "discounted total 117.00" in proc.stdout


def test_quickstart(capsys):
    qs = example("quickstart")
    result = qs.main()
    assert result.status == "completed"
    assert result.errors == []
    # the first pricing attempt fails on purpose; the retry succeeds
    assert result.context["calculate_total"] == {"order_id": "A-1001", "total": 130.0, "attempts": 2}
    assert result.context["apply_discount"] == {"order_id": "A-1001", "total": 117.0}
    assert result.skipped == []
    assert "order A-1001: completed" in capsys.readouterr().out


def test_quickstart_small_order_skips_the_discount():
    result = example("quickstart").main("A-1002")
    assert result.status == "completed"
    assert result.context["calculate_total"]["total"] == 19.0
    assert "apply_discount" not in result.context
    assert result.skipped == ["apply_discount"]


def test_order_pipeline_in_stock_branch():
    op = example("order_pipeline")
    result = op.flow.run(initial_context={"order_id": "O-1"})
    assert result.status == "completed", result.errors
    assert result.context["charge_payment"]["paid_by"] == "card"
    assert result.context["send_confirmation"] == "O-1: 2 x lamp, ships today, paid by card"
    # the untaken branch is dead, yet the `all` join (charge_payment) ran
    assert sorted(result.skipped) == ["fraud_review", "schedule_backorder"]
    assert "pay_by_invoice" not in result.context


def test_order_pipeline(capsys):
    results = example("order_pipeline").main()
    assert [r.status for r in results.values()] == ["completed", "completed"]
    backordered = results["O-2"]
    assert backordered.errors == []
    assert backordered.context["send_confirmation"] == "O-2: 1 x sofa, ships when restocked, paid by invoice"
    assert backordered.context["pay_by_invoice"]["paid_by"] == "invoice"
    assert backordered.context["fraud_review"] == {"order_id": "O-2", "queued_for_review": True}
    assert backordered.skipped == ["reserve_stock"]
    assert "O-2: completed" in capsys.readouterr().out


def test_fan_out_fan_in():
    result = example("fan_out_fan_in").main()
    assert result.status == "completed"
    dashboard = result.context["build_dashboard"]
    # the join's input is {predecessor id: output}, in edge declaration order
    assert dashboard["sections"] == ["load_profile", "load_orders", "load_recommendations", "load_notifications"]
    assert dashboard["greeting"] == "Hello Ada (pro)"
    assert dashboard["order_count"] == 2
    assert dashboard["unread"] == 3
    assert result.context["_inputs.build_dashboard"]["load_recommendations"] == ["desk lamp", "notebook"]


def test_loop():
    lp = example("loop")
    result = lp.main()
    assert result.status == "completed"
    assert result.context["pages"] == 3
    assert result.context["users"] == lp.USERS
    assert result.context["cursor"] is None
    assert result.context["report"] == {"total": 23, "first": "user-01", "last": "user-23"}


def test_batch():
    result = example("batch").main()
    assert result.status == "completed"
    taxed = result.context["taxed_invoices"]
    assert len(taxed) == 1000
    assert [t["id"] for t in taxed] == [f"INV-{n:04d}" for n in range(1, 1001)]  # item order kept
    assert taxed[499] == {"id": "INV-0500", "gross": 600.0}
    assert result.context["summarize"] == {"count": 1000, "gross_total": 600600.0}


def test_subflow():
    sf = example("subflow")
    result = sf.main()
    assert result.status == "completed", result.errors
    assert result.context["order_total"] == 36.45
    assert result.context["shipping_fee"] == 4.95
    assert result.context["price"] == {"order_total": 36.45, "shipping_fee": 4.95}
    assert result.context["receipt"] == "charged 36.45 (shipping 4.95)"
    assert "subtotal" not in result.context  # the child's own keys stay in the child
    # FlowRuntime(blueprints=[flow]) registered the child blueprint and merged its registry
    assert "price-cart" in sf.runtime.blueprints
    assert set(sf.price_cart.registry) <= set(sf.runtime.registry)


def test_approval(capsys):
    results = example("approval").main()
    paused, approved, rejected = results["paused"], results["approved"], results["rejected"]

    assert paused.status == "awaiting"
    assert paused.awaiting == ["approval"]
    assert paused.context["_awaitingNodeIds"] == ["approval"]
    assert paused.context["_awaitingDetails"]["approval"]["approver"] == "finance"
    assert "approval" in json.loads(paused.serialized_context)["_awaitingDetails"]

    assert approved.status == "completed", approved.errors
    assert approved.context["pay_out"] == "paid 380.00 to grace (within budget)"
    assert approved.context["approval"] == {"note": "within budget"}
    assert approved.skipped == ["notify_rejected"]
    assert "_awaitingDetails" not in approved.context

    assert rejected.status == "completed", rejected.errors
    assert rejected.context["notify_rejected"] == "told grace the expense was rejected (no receipt)"
    assert rejected.skipped == ["pay_out"]

    out = capsys.readouterr().out
    assert "first run: awaiting" in out and "approve -> completed" in out and "reject  -> completed" in out


def test_order_blueprint_json_runs_with_the_order_app():
    from examples.order_app import runtime

    text = (EXAMPLES / "blueprints" / "order.json").read_text()
    blueprint = WorkflowBlueprint.from_json(text)
    assert blueprint.to_dict() == json.loads(text)  # the TS wire format round-trips unchanged
    fetch = blueprint.node("fetch").config
    assert (fetch.max_retries, fetch.retry_delay, fetch.timeout) == (3, 0.1, 5.0)  # ms on the wire, s here

    assert isinstance(runtime, FlowRuntime)
    in_stock = runtime.run(blueprint, {"orderId": "A-1001"})
    assert in_stock.status == "completed", in_stock.errors
    assert in_stock.context["notify"] == "order-shipped: tracking TRK-A-1001"  # via the edge transform
    assert in_stock.context["ship"]["shipsInDays"] == 0
    assert in_stock.skipped == ["backorder"]

    backordered = runtime.run(blueprint, {"orderId": "A-1002"})
    assert backordered.status == "completed", backordered.errors
    assert backordered.context["ship"]["shipsInDays"] == 7
    assert backordered.skipped == ["reserve"]

    no_context = runtime.run("order")  # what `flowcraft run` without --context does
    assert no_context.status == "completed"
    assert no_context.context["fetch"]["orderId"] == "A-1001"


def test_order_app_main(capsys):
    result = example("order_app").main("A-1002")
    assert result.status == "completed"
    assert result.context["notify"] == "order-shipped: tracking TRK-A-1002"
    assert "order A-1002: completed" in capsys.readouterr().out


def test_order_blueprint_falls_back_to_the_cache():
    from examples.order_app import runtime

    calls = []

    def order_service_down(ctx):
        calls.append(ctx.attempt)
        raise ConnectionError("order service unreachable")

    result = runtime.run("order", {"orderId": "A-1002"}, registry={"fetch-order": order_service_down})
    assert calls == [1, 2, 3]  # maxRetries 3 = three attempts in all
    assert result.status == "completed", result.errors
    assert result.context["fetch"]["stale"] is True
    assert result.context["notify"] == "order-shipped: tracking TRK-A-1002"


def test_limited_charges_at_most_two_at_once(capsys):
    example("limited").main()
    out = capsys.readouterr().out
    assert "in memory, 8 threads: completed, total 360, at most 2 charges at once" in out
    assert "a worker of 4 threads: completed, total 360, at most 2 charges at once" in out
