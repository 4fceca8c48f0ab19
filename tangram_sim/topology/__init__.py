"""Where bytes travel: the cluster's nodes, GPUs, links and stores, apart from the lifecycle.

`spec` is the configuration (`cluster.topology`), `links` the fair-share link as plain data, `graph` the
cluster's links and the path a unit takes from each kind of source to a GPU, `multicast` the block
schedules of one model sent to several receivers (chain, binomial pipeline). The simulator's fabric
(`core.links`) moves bytes over these links; the policies ask `graph` how fast a source is.
"""

from tangram_sim.topology.graph import SOURCES, Topology
from tangram_sim.topology.links import Link
from tangram_sim.topology.spec import TopologySpec, topology_from_config

__all__ = ["SOURCES", "Link", "Topology", "TopologySpec", "topology_from_config"]
