//! The command line of the `keel-agent` binary, parsed by hand.
//!
//! The agent has three commands with a handful of `--flag value` options each,
//! which does not justify a parser dependency. Parsing lives in the library
//! (not in `main.rs`) so it can be unit-tested; `main.rs` only maps the
//! outcome to an exit code: 2 for a [`UsageError`], 1 for anything that went
//! wrong afterwards.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::enrol::EnrolOptions;

/// The help text.
pub const USAGE: &str = "\
usage:
  keel-agent join --api-url URL --join-token ID.SECRET --state-dir DIR
                  --listen ADDR:PORT --name NAME
                  [--ca-fingerprint SHA256_HEX] [--agent-url URL] [--reenrol]
  keel-agent run (--config FILE | --state-dir DIR)
  keel-agent status (--config FILE | --state-dir DIR)
  keel-agent --help

join    trades a single-use join token for a node certificate and saves it,
        with the control plane's CA and task-signing keys, in DIR (mode 0700).
        --ca-fingerprint pins the control-plane CA delivered with the token;
        --agent-url overrides the URL announced to the control plane
        (default https://ADDR:PORT). --reenrol replaces the enrolment in DIR
        with a token made by `api join-token --node ID` for this node,
        keeping its task log and workloads. (`enrol` is the same command.)
run     serves signed tasks over mutual TLS on the enrolled address until
        SIGINT or SIGTERM, renewing the node certificate and learning new
        task-signing keys as it goes. Exits 78 when the node needs
        re-enrolment (certificate expired, revoked or superseded).
        --config names a TOML file (state_dir, [timing], [workloads]; see
        doc/node-agent.md); --state-dir alone means the defaults.
status  prints the node, its certificate, its keys and the state of its
        task log; exits 78 if the node needs re-enrolment, 1 if the task
        log's hash chain is broken.

Logging is controlled by RUST_LOG (default: info).";

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CliCommand {
    /// `keel-agent enrol ...`
    Enrol(EnrolOptions),
    /// `keel-agent run (--config FILE | --state-dir DIR)`
    Run(ConfigSource),
    /// `keel-agent status (--config FILE | --state-dir DIR)`
    Status(ConfigSource),
    /// `keel-agent --help`
    Help,
}

/// Where `run` and `status` find their configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// A configuration file.
    File(PathBuf),
    /// Just the state directory, with the default settings.
    StateDir(PathBuf),
}

impl ConfigSource {
    /// The configuration, with the `KEEL_AGENT_*` overrides applied.
    pub fn load(&self) -> Result<crate::config::AgentConfig, crate::config::ConfigError> {
        let config = match self {
            ConfigSource::File(path) => crate::config::AgentConfig::load(path)?,
            ConfigSource::StateDir(dir) => crate::config::AgentConfig::for_state_dir(dir),
        };
        Ok(config.with_env_overrides())
    }
}

fn config_source(rest: &[String]) -> Result<ConfigSource, UsageError> {
    let mut flags = Flags::parse(rest, &["--state-dir", "--config"])?;
    match (flags.optional("--config"), flags.optional("--state-dir")) {
        (Some(file), None) if !file.is_empty() => Ok(ConfigSource::File(file.into())),
        (None, Some(dir)) if !dir.is_empty() => Ok(ConfigSource::StateDir(dir.into())),
        (Some(_), Some(_)) => Err(UsageError(
            "give --config or --state-dir, not both".to_owned(),
        )),
        _ => Err(UsageError(
            "--config FILE or --state-dir DIR is required".to_owned(),
        )),
    }
}

/// The command line is wrong; the message says how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Parses the arguments after the program name.
pub fn parse_command_line(arguments: &[String]) -> Result<CliCommand, UsageError> {
    if arguments
        .iter()
        .any(|argument| argument == "--help" || argument == "-h")
    {
        return Ok(CliCommand::Help);
    }
    let Some((command, rest)) = arguments.split_first() else {
        return Err(UsageError(
            "a command is required: join, run or status".to_owned(),
        ));
    };
    match command.as_str() {
        "join" | "enrol" => parse_enrol(rest).map(CliCommand::Enrol),
        "run" => config_source(rest).map(CliCommand::Run),
        "status" => config_source(rest).map(CliCommand::Status),
        other => Err(UsageError(format!(
            "unknown command {other:?}: expected join, run or status"
        ))),
    }
}

fn parse_enrol(arguments: &[String]) -> Result<EnrolOptions, UsageError> {
    let reenrol = arguments.iter().any(|argument| argument == "--reenrol");
    let arguments: Vec<String> = arguments
        .iter()
        .filter(|argument| *argument != "--reenrol")
        .cloned()
        .collect();
    let mut flags = Flags::parse(
        &arguments,
        &[
            "--api-url",
            "--join-token",
            "--state-dir",
            "--listen",
            "--name",
            "--ca-fingerprint",
            "--agent-url",
        ],
    )?;
    let listen_text = flags.required("--listen")?;
    let listen: SocketAddr = listen_text.parse().map_err(|_| {
        UsageError(format!(
            "--listen must be an IP address and port such as 127.0.0.1:7443, got {listen_text:?}"
        ))
    })?;
    let join_token = flags.required("--join-token")?;
    let token_has_two_parts = join_token
        .split_once('.')
        .is_some_and(|(id, secret)| !id.is_empty() && !secret.is_empty());
    if !token_has_two_parts {
        // The token itself is not echoed: it is a secret.
        return Err(UsageError(
            "--join-token must have the form ID.SECRET".to_owned(),
        ));
    }
    Ok(EnrolOptions {
        api_url: flags.required("--api-url")?,
        join_token,
        state_dir: PathBuf::from(flags.required("--state-dir")?),
        listen,
        name: flags.required("--name")?,
        ca_fingerprint: flags.optional("--ca-fingerprint"),
        agent_url: flags.optional("--agent-url"),
        reenrol,
    })
}

/// `--flag value` and `--flag=value` pairs, each flag at most once.
struct Flags {
    values: Vec<(String, String)>,
}

impl Flags {
    fn parse(arguments: &[String], known: &[&str]) -> Result<Self, UsageError> {
        let mut values: Vec<(String, String)> = Vec::new();
        let mut remaining = arguments.iter();
        while let Some(argument) = remaining.next() {
            let (flag, value) = match argument.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => {
                    (flag.to_owned(), value.to_owned())
                }
                _ => {
                    if !argument.starts_with("--") {
                        return Err(UsageError(format!("unexpected argument {argument:?}")));
                    }
                    let value = remaining
                        .next()
                        .ok_or_else(|| UsageError(format!("{argument} needs a value")))?;
                    (argument.clone(), value.clone())
                }
            };
            if !known.contains(&flag.as_str()) {
                return Err(UsageError(format!("unknown option {flag}")));
            }
            if values.iter().any(|(seen, _)| *seen == flag) {
                return Err(UsageError(format!("{flag} given more than once")));
            }
            values.push((flag, value));
        }
        Ok(Self { values })
    }

    fn optional(&mut self, flag: &str) -> Option<String> {
        let index = self.values.iter().position(|(name, _)| name == flag)?;
        Some(self.values.swap_remove(index).1)
    }

    fn required(&mut self, flag: &str) -> Result<String, UsageError> {
        match self.optional(flag) {
            Some(value) if !value.is_empty() => Ok(value),
            Some(_) => Err(UsageError(format!("{flag} must not be empty"))),
            None => Err(UsageError(format!("{flag} is required"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arguments(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn a_full_enrol_command_line_is_parsed() {
        let command = parse_command_line(&arguments(
            "enrol --api-url http://127.0.0.1:8080 --join-token abc.def --state-dir /var/lib/keel \
             --listen 127.0.0.1:7443 --name node-a --ca-fingerprint=00ff",
        ))
        .unwrap();
        let CliCommand::Enrol(options) = command else {
            panic!("expected enrol, got {command:?}");
        };
        assert_eq!(options.api_url, "http://127.0.0.1:8080");
        assert_eq!(options.join_token, "abc.def");
        assert_eq!(options.state_dir, PathBuf::from("/var/lib/keel"));
        assert_eq!(options.listen, "127.0.0.1:7443".parse().unwrap());
        assert_eq!(options.name, "node-a");
        assert_eq!(options.ca_fingerprint.as_deref(), Some("00ff"));
        assert_eq!(options.agent_url, None);
    }

    #[test]
    fn run_needs_only_the_state_dir() {
        assert_eq!(
            parse_command_line(&arguments("run --state-dir /tmp/agent")).unwrap(),
            CliCommand::Run(ConfigSource::StateDir(PathBuf::from("/tmp/agent")))
        );
    }

    #[test]
    fn join_is_enrol_and_takes_reenrol_and_status_takes_the_state_dir() {
        let command = parse_command_line(&arguments(
            "join --api-url http://x --join-token a.b --state-dir d --listen 127.0.0.1:1 \
             --name n --reenrol",
        ))
        .unwrap();
        assert!(matches!(command, CliCommand::Enrol(ref options) if options.reenrol));
        assert_eq!(
            parse_command_line(&arguments("status --config /etc/keel/agent.toml")).unwrap(),
            CliCommand::Status(ConfigSource::File(PathBuf::from("/etc/keel/agent.toml")))
        );
    }

    #[test]
    fn help_wins_over_everything_else() {
        assert_eq!(
            parse_command_line(&arguments("run --bogus --help")).unwrap(),
            CliCommand::Help
        );
    }

    #[test]
    fn mistakes_are_usage_errors() {
        for command_line in [
            "",
            "start",
            "run",
            "run --state-dir",
            "run --state-dir a --state-dir b",
            "run --state-dir a --verbose yes",
            "run --state-dir a --config b",
            "run stray --state-dir a",
            "enrol --api-url http://x --join-token abc.def --state-dir d --listen nowhere --name n",
            "enrol --api-url http://x --join-token nodot --state-dir d --listen 127.0.0.1:1 --name n",
            "enrol --api-url http://x --join-token abc.def --state-dir d --listen 127.0.0.1:1",
        ] {
            assert!(
                parse_command_line(&arguments(command_line)).is_err(),
                "{command_line:?} should be refused"
            );
        }
    }

    #[test]
    fn a_malformed_join_token_is_not_echoed_back() {
        let error = parse_command_line(&arguments(
            "enrol --api-url http://x --join-token secretvalue --state-dir d \
             --listen 127.0.0.1:1 --name n",
        ))
        .unwrap_err();
        assert!(!error.0.contains("secretvalue"));
    }
}
