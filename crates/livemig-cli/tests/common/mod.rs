//! Helpers shared by the CLI's end-to-end tests.

/// True if KVM is usable; prints why the test is skipped otherwise.
pub fn kvm_available(test: &str) -> bool {
    match minivm::kvm_usable() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}
