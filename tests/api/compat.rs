//! Replays the firmware wire-contract vectors in `firmware-compat/vectors/` against the
//! running server, each on a fresh database.

use crate::helpers::spawn_app;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_vectors_replay_against_the_server() {
    let vectors = firmware_compat::load_vectors(std::path::Path::new(firmware_compat::VECTORS_DIR))
        .expect("vectors load");
    assert!(
        vectors.len() >= 5,
        "expected the vector suite, found {}",
        vectors.len()
    );
    for vector in vectors {
        let app = spawn_app().await;
        let mut admin = |args: &[String]| -> anyhow::Result<String> {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (ok, stdout, stderr) = app.try_admin(&args);
            anyhow::ensure!(ok, "ozone {args:?} failed: {stderr}");
            Ok(stdout)
        };
        vector
            .replay(app.addr, &mut admin)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
}
