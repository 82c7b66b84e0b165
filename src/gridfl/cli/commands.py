"""The ``gridfl`` commands besides ``serve`` and ``simulate``, one module per command group.

Each is a thin call into the library. User mistakes (bad options, unreachable node,
refused requests) end in one clear line on stderr and exit code 1, never a traceback.
"""

from gridfl.cli.bundle import compile_, host
from gridfl.cli.demo import demo
from gridfl.cli.status import retrieve, status
from gridfl.cli.worker import worker

COMMANDS = [demo, compile_, host, status, retrieve, worker]
