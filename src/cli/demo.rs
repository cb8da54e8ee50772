//! `cachecast demo`: three nodes in this process, telling their story.

use std::process::ExitCode;

/// Runs the demo to its end.
pub(crate) fn demo() -> ExitCode {
    // Only problems are logged: the demo prints its own story on stdout.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(super::story::run(Box::new(std::io::stdout()))) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            // The demo writes only to stdout: a reader that went away
            // (`cachecast demo | head`) ends it, quietly.
            let closed = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            });
            if closed {
                return ExitCode::SUCCESS;
            }
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
