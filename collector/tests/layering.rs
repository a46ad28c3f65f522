//! The modules of the collector import one another without circles: each file imports only
//! files below it, so that the crate can be read one module at a time. A new circle fails
//! here, naming its files and the paths that tie them.

use std::path::Path;

#[test]
fn modules_import_without_circles() {
    chaperone_test_support::assert_no_circles(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
}
