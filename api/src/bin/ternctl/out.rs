//! ternctl's standard output. `print!` panics when the reader has gone away (`ternctl ... | head`);
//! here a closed pipe ends ternctl quietly, as a Unix tool killed by SIGPIPE would, and any other
//! write error is reported.

use std::io::{ErrorKind, Write};

/// Writes `text` to stdout and flushes it.
pub fn emit(text: &str) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        if e.kind() == ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("ternctl: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}
