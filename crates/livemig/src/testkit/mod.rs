//! Stand-ins for tests, benchmarks and demos (feature `testkit`): a guest
//! workload that writes process memory, a TCP proxy that breaks
//! connections on purpose, a destination that swallows a stream, a link
//! whose rate collapses on command, and
//! (feature `kvm`) the vCPU mode of a KVM test guest. Not needed to embed
//! livemig in a VMM.

pub mod fault_proxy;
#[cfg(feature = "kvm")]
pub mod kvm_guest;
pub mod sink;
pub mod slow_link;
pub mod workload;
