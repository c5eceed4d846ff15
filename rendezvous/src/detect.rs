//! Which scheduler started this process, and its place in the job step.

use sha2::{Digest, Sha256};

use dsm_core::auth;

use crate::{RendezvousError, Scheduler, SchedulerJob};

/// Reads the scheduler's variables through `get` (the environment, or a
/// table in tests). `Ok(None)`: no scheduler (and no dsmexec) started us.
/// Open MPI comes first: `mpirun` inside a Slurm allocation also passes
/// the allocation's `SLURM_*` variables on.
pub fn detect_with(
    get: impl Fn(&str) -> Option<String>,
) -> Result<Option<SchedulerJob>, RendezvousError> {
    let number = |scheduler, name: &'static str| -> Result<usize, RendezvousError> {
        let value = get(name).ok_or(RendezvousError::Missing { scheduler, name })?;
        value
            .trim()
            .parse()
            .map_err(|_| RendezvousError::BadVariable {
                name,
                value,
                why: "expected a non-negative integer".into(),
            })
    };
    let host = |var: &str| {
        get(var)
            .filter(|h| !h.is_empty())
            .or_else(|| {
                nix::unistd::gethostname()
                    .ok()
                    .map(|h| h.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "?".to_string())
    };
    let job = if get("OMPI_COMM_WORLD_RANK").is_some() {
        let s = Scheduler::OpenMpi;
        let rank = number(s, "OMPI_COMM_WORLD_RANK")?;
        let size = number(s, "OMPI_COMM_WORLD_SIZE")?;
        let namespace = get("PMIX_NAMESPACE")
            .or_else(|| get("OMPI_MCA_ess_base_jobid"))
            .ok_or(RendezvousError::Missing {
                scheduler: s,
                name: "PMIX_NAMESPACE",
            })?;
        // The namespace number is a hash of mpirun's host and pid: add
        // mpirun's contact address so that two mpiruns never share a key.
        let mut digest = Sha256::new();
        for name in [
            "PMIX_NAMESPACE",
            "OMPI_MCA_ess_base_jobid",
            "OMPI_MCA_orte_hnp_uri",
        ] {
            digest.update(get(name).unwrap_or_default().as_bytes());
            digest.update([0]);
        }
        let hash = auth::hex_encode(&digest.finalize()[..8]);
        SchedulerJob {
            scheduler: s,
            rank,
            size,
            key: format!("ompi-{}-{hash}", sanitize(&namespace)),
            job_id: format!("mpirun {namespace}"),
            host: host("PMIX_HOSTNAME"),
        }
    } else if get("SLURM_PROCID").is_some() {
        let s = Scheduler::Slurm;
        let step = get("SLURM_STEP_ID")
            .or_else(|| get("SLURM_STEPID"))
            .ok_or(RendezvousError::BatchStep)?;
        let rank = number(s, "SLURM_PROCID")?;
        let size = if get("SLURM_STEP_NUM_TASKS").is_some() {
            number(s, "SLURM_STEP_NUM_TASKS")?
        } else {
            number(s, "SLURM_NTASKS")?
        };
        let job =
            get("SLURM_JOB_ID")
                .or_else(|| get("SLURM_JOBID"))
                .ok_or(RendezvousError::Missing {
                    scheduler: s,
                    name: "SLURM_JOB_ID",
                })?;
        let cluster = get("SLURM_CLUSTER_NAME").unwrap_or_default();
        SchedulerJob {
            scheduler: s,
            rank,
            size,
            key: sanitize(&format!("slurm-{cluster}-{job}.{step}")),
            job_id: format!("slurm {job}.{step}"),
            host: host("SLURMD_NODENAME"),
        }
    } else {
        return Ok(None);
    };
    if job.size == 0 || job.rank >= job.size {
        return Err(RendezvousError::BadVariable {
            name: "rank",
            value: job.rank.to_string(),
            why: format!("must be below the job size {}", job.size),
        });
    }
    Ok(Some(job))
}

/// [`detect_with`] on this process's environment.
pub fn detect() -> Result<Option<SchedulerJob>, RendezvousError> {
    detect_with(|name| std::env::var(name).ok())
}

fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn detects_srun_steps() {
        let job = detect_with(env(&[
            ("SLURM_PROCID", "2"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_STEP_NUM_TASKS", "4"),
            ("SLURM_JOB_ID", "12"),
            ("SLURM_STEP_ID", "3"),
            ("SLURM_CLUSTER_NAME", "c1"),
            ("SLURMD_NODENAME", "n7"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(job.scheduler, Scheduler::Slurm);
        assert_eq!((job.rank, job.size), (2, 4));
        assert_eq!(job.key, "slurm-c1-12.3");
        assert_eq!(job.host, "n7");
    }

    #[test]
    fn the_batch_script_is_not_a_step() {
        let err = detect_with(env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_JOB_ID", "12"),
        ]))
        .unwrap_err();
        assert!(matches!(err, RendezvousError::BatchStep), "{err}");
        assert!(err.to_string().contains("srun PROGRAM"));
    }

    #[test]
    fn mpirun_wins_over_the_slurm_allocation() {
        let vars = [
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_JOB_ID", "12"),
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("PMIX_NAMESPACE", "1376321537"),
            ("OMPI_MCA_orte_hnp_uri", "1376321536.0;tcp://10.0.0.1:46899"),
        ];
        let a = detect_with(env(&vars)).unwrap().unwrap();
        assert_eq!(a.scheduler, Scheduler::OpenMpi);
        assert_eq!((a.rank, a.size), (3, 4));
        assert!(a.key.starts_with("ompi-1376321537-"), "{}", a.key);
        // Another mpirun with the same namespace number gets another key.
        let mut other = vars;
        other[6].1 = "1376321536.0;tcp://10.0.0.2:46899";
        let b = detect_with(env(&other)).unwrap().unwrap();
        assert_ne!(a.key, b.key);
    }

    #[test]
    fn bad_and_missing_variables_are_named() {
        assert!(detect_with(env(&[])).unwrap().is_none());
        let err = detect_with(env(&[("OMPI_COMM_WORLD_RANK", "1")])).unwrap_err();
        assert!(err.to_string().contains("OMPI_COMM_WORLD_SIZE"), "{err}");
        let err = detect_with(env(&[
            ("SLURM_PROCID", "4"),
            ("SLURM_STEP_NUM_TASKS", "4"),
            ("SLURM_JOB_ID", "1"),
            ("SLURM_STEP_ID", "0"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("below the job size 4"), "{err}");
        let err = detect_with(env(&[("SLURM_PROCID", "x"), ("SLURM_STEP_ID", "0")])).unwrap_err();
        assert!(err.to_string().contains("SLURM_PROCID"), "{err}");
    }
}
