use std::sync::Arc;

use spacegate_session::{MemoryRegistry, conformance};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_registry_passes_the_conformance_suite() {
    conformance::run_all(Arc::new(MemoryRegistry::default()), "t-").await;
}
