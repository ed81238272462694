//! Stand-ins for tests, benchmarks and demos (feature `testkit`): a guest
//! workload that writes process memory, and a TCP proxy that breaks
//! connections on purpose. Not needed to embed livemig in a VMM.

pub mod fault_proxy;
pub mod workload;
