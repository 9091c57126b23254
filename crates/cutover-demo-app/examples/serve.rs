//! Runs the demo app on one thread, for load measurements with an external generator:
//! `cargo run --release -p cutover-demo-app --example serve -- 18080` then point `wrk` at it.
//! It must not grow options of its own; the real command line is `cutover demo-app`.

use std::time::Duration;

fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(18080);
    // One core, as the requirement is stated per core.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        eprintln!("demo app on {}", listener.local_addr()?);
        let opts = cutover_demo_app::DemoOptions {
            version: "v1".into(),
            instance: "bench".into(),
            error_rate: 0.0,
            latency: Duration::ZERO,
            fail_health: false,
        };
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        cutover_demo_app::run(listener, opts, shutdown).await
    })
}
