"""The hooks a qbench plugin may implement. Every hook here is documented (a test checks it)."""
import pluggy

hookspec = pluggy.HookspecMarker("qbench")


@hookspec
def register_methods(register):
    """Call ``register(MethodClass)`` for each quantization method this plugin provides.

    ``MethodClass`` subclasses :class:`qbench.method.Method`: a ``name``, typed ``params``
    and ``quantize(model, calibration)``.
    """


@hookspec
def register_suites(register):
    """Call ``register(SuiteClass)`` for each measurement suite this plugin provides.

    ``SuiteClass`` subclasses :class:`qbench.suite.Suite`: a ``name``, typed ``params`` and
    ``measure(ctx)`` returning ``{metric: Metric(value, unit)}``.
    """


@hookspec
def register_executors(register):
    """Call ``register(name, ExecutorClass)`` for each way of running matrix cells.

    The built-in ``local`` executor runs each cell in its own subprocess; a cluster executor
    (e.g. Ray) only has to implement :class:`qbench.executors.Executor`.
    """
