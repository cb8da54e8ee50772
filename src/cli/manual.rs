//! Shell completions and manual pages, from the same definition as
//! `--help`.

use std::process::ExitCode;

use clap::CommandFactory;

use super::{ended, out};
use crate::Cli;

/// Prints the completion script for `shell`.
pub(crate) fn completions(shell: clap_complete::Shell) -> ExitCode {
    // The generators offer hidden subcommands too: complete a copy
    // without them.
    let full = Cli::command();
    let mut cmd = clap::Command::new("cachecast")
        .version(env!("CARGO_PKG_VERSION"))
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    if let Some(about) = full.get_about() {
        cmd = cmd.about(about.clone());
    }
    let mut text = Vec::new();
    clap_complete::generate(shell, &mut cmd, "cachecast", &mut text);
    match out(&String::from_utf8_lossy(&text)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => ended(&e),
    }
}

/// What the manual says beyond the options, in roff: where the
/// configuration comes from, the environment, the files, the exit status.
const MAN_EXTRA: &str = r#".SH ENVIRONMENT
.TP
.B DHIS2_HOME
The directory holding
.IR dhis.conf ,
when
.B \-\-config
is not given.
.TP
.B RUST_LOG
The log filter of
.BR run ,
e.g.
.B info
(the default) or
.BR cachecast=debug .
.SH FILES
.TP
.I /opt/dhis2/dhis.conf
The configuration when neither
.B \-\-config
nor
.B DHIS2_HOME
is given: DHIS 2's own file, with its
.B cluster.*
keys and the
.B cachecast.*
extensions.
.TP
.I /etc/default/cachecast
The environment of the packaged systemd unit
.RB ( DHIS2_HOME ,
.BR RUST_LOG ).
.TP
.I /var/lib/cachecast
The state directory of the packaged unit, for
.BR cachecast.state.file .
.SH EXIT STATUS
0 on success (for
.BR run ,
after a graceful shutdown); 2 for an invalid configuration (restarting
does not fix it); 1 for any other failure.
.SH SEE ALSO
.BR systemctl (1),
.BR journalctl (1);
/usr/share/doc/cachecast/ for the operations guide.
"#;

/// Writes the manual pages into `dir`.
pub(crate) fn manpages(dir: &std::path::Path) -> ExitCode {
    let written = std::fs::create_dir_all(dir).and_then(|()| {
        // One page per subcommand, then the main page again with the
        // sections clap knows nothing of.
        clap_mangen::generate_to(Cli::command(), dir)?;
        let mut page = Vec::new();
        let man = clap_mangen::Man::new(Cli::command());
        man.render_title(&mut page)?;
        man.render_name_section(&mut page)?;
        man.render_synopsis_section(&mut page)?;
        man.render_description_section(&mut page)?;
        man.render_options_section(&mut page)?;
        man.render_subcommands_section(&mut page)?;
        page.extend_from_slice(MAN_EXTRA.as_bytes());
        man.render_version_section(&mut page)?;
        std::fs::write(dir.join("cachecast.1"), page)
    });
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "error: cannot write the manual pages into {}: {e}",
                dir.display()
            );
            ExitCode::FAILURE
        }
    }
}
