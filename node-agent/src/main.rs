//! The `keel-agent` binary: parses the command line, sets up logging and a
//! tokio runtime, and runs `join`, `run` or `status` from the library.
//!
//! Exit codes: 0 on success, 2 for a usage error, 78 when the node needs
//! re-enrolment, 1 for any other failure, with an explanation on stderr.

use std::process::ExitCode;

use keel_agent::RunOutcome;
use keel_agent::cli::{CliCommand, USAGE, UsageError, parse_command_line};
use keel_agent::status::EXIT_NEEDS_REENROLMENT;

fn main() -> ExitCode {
    let arguments: Result<Vec<String>, _> = std::env::args_os()
        .skip(1)
        .map(std::ffi::OsString::into_string)
        .collect();
    // The per-workload shim: no runtime, no logging set-up, nothing else.
    if let Ok(arguments) = &arguments
        && arguments.first().map(String::as_str) == Some("shim")
    {
        return match keel_agent::shim::parse(&arguments[1..]) {
            Ok(options) => ExitCode::from(keel_agent::shim::run(&options)),
            Err(message) => {
                eprintln!("keel-agent: {message}");
                ExitCode::from(2)
            }
        };
    }
    let command = arguments
        .map_err(|_| UsageError("arguments must be valid UTF-8".to_owned()))
        .and_then(|arguments| parse_command_line(&arguments));
    let command = match command {
        Ok(CliCommand::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(command) => command,
        Err(error) => {
            eprintln!("keel-agent: {error}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };

    // `run` reads its configuration first: it says where traces go.
    let run_config = match &command {
        CliCommand::Run(source) => match source.load() {
            Ok(config) => Some(config),
            Err(error) => {
                eprintln!("keel-agent: {error}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let telemetry = keel_telemetry::init(&keel_telemetry::Settings {
        service: "keel-agent",
        filter: "info",
        style: keel_telemetry::LogStyle::Compact,
        otlp_endpoint: run_config
            .as_ref()
            .and_then(|config| config.otlp_endpoint.as_deref()),
    });
    // Held until the end of `main`: dropping it sends the last spans.
    let _telemetry = match telemetry {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("keel-agent: {error}");
            return ExitCode::FAILURE;
        }
    };

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("keel-agent: could not start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };

    let outcome = runtime.block_on(async {
        match command {
            CliCommand::Enrol(options) => keel_agent::enrol(&options)
                .await
                .map(|node| {
                    println!(
                        "enrolled as node {} (enrolment epoch {}); state saved in {}",
                        node.node_id,
                        node.enrolment_epoch,
                        node.state_dir.display()
                    );
                    0
                })
                .map_err(|error| error.to_string()),
            CliCommand::Run(_) => match run_config {
                None => Err("the configuration was not loaded".to_owned()),
                Some(config) => match keel_agent::run_until_signal(&config).await {
                    Ok(RunOutcome::Stopped) => Ok(0),
                    Ok(RunOutcome::NeedsReenrolment(reason)) => {
                        eprintln!(
                            "keel-agent: this node needs re-enrolment: {reason}\n\
                         create a token with `api join-token --node <node id>` and run \
                         `keel-agent join --reenrol ...`"
                        );
                        Ok(EXIT_NEEDS_REENROLMENT)
                    }
                    Err(error) => Err(error.to_string()),
                },
            },
            CliCommand::Status(source) => source
                .load()
                .map_err(|error| error.to_string())
                .and_then(|config| {
                    keel_agent::status::report(&config.state_dir).map_err(|error| error.to_string())
                })
                .map(|(text, exit)| {
                    print!("{text}");
                    exit
                }),
            CliCommand::Help => Ok(0),
        }
    });
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(message) => {
            eprintln!("keel-agent: {message}");
            ExitCode::FAILURE
        }
    }
}
