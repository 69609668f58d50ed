"""Where the ranks of one job meet: the port every node derives from the job alone, so no node has to be told.

Light on purpose (no torch): the launchers read it to write their scripts, the engine to join the job.
"""

from __future__ import annotations


def master_port_for_job(job_id: int | str) -> int:
    """The rendezvous port of SLURM job ``job_id``: the same on every node of the job, different between jobs.

    Ports 20000-31999 stay below Linux's ephemeral range (32768 and up), so no outgoing connection holds
    the port already, and 12000 consecutive job ids never share one on a node.
    """
    return 20000 + int(job_id) % 12000
