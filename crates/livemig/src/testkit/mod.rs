//! Stand-ins for tests, benchmarks and demos (feature `testkit`): a guest
//! workload that writes process memory, a TCP proxy that breaks
//! connections on purpose, and a destination that swallows a stream. Not needed to embed livemig in a VMM.

pub mod fault_proxy;
pub mod sink;
pub mod workload;
