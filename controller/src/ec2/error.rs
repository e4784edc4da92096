//! EC2's errors: a code, a message and the HTTP status EC2 answers with,
//! written as EC2's `<Response><Errors><Error>…` document. The gRPC
//! status of the call an action maps onto becomes the code EC2 clients
//! expect (the controller's messages name the field and carry EC2's code
//! where one rule has several, e.g. "(VolumeInUse)").

use tonic::Code;

use super::xml::Xml;

/// An EC2 error answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ec2Error {
    /// HTTP status.
    pub status: u16,
    /// EC2 error code, e.g. `InvalidInstanceID.NotFound`.
    pub code: String,
    /// Human-readable message.
    pub message: String,
}

impl Ec2Error {
    /// Any code and status.
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> Self {
        Ec2Error {
            status,
            code: code.to_string(),
            message: message.into(),
        }
    }

    /// `MissingParameter` naming `name`.
    pub fn missing(name: &str) -> Self {
        Self::new(
            400,
            "MissingParameter",
            format!("The request must contain the parameter {name}"),
        )
    }

    /// `InvalidParameterValue`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(400, "InvalidParameterValue", message)
    }

    /// `InvalidInstanceID.Malformed` for `id`.
    pub fn malformed_instance(id: &str) -> Self {
        Self::new(
            400,
            "InvalidInstanceID.Malformed",
            format!("Invalid id: {id:?} (expecting \"i-...\")"),
        )
    }

    /// EC2's error document.
    pub fn to_xml(&self, request_id: &str) -> String {
        let mut x = Xml::default();
        x.wrap("Response", |x| {
            x.wrap("Errors", |x| {
                x.wrap("Error", |x| {
                    x.leaf("Code", &self.code).leaf("Message", &self.message);
                });
            });
            x.leaf("RequestID", request_id);
        });
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{}",
            x.into_string()
        )
    }
}

/// The not-found code of the resource a message's field names (the
/// controller's NOT_FOUND messages start with the field).
fn not_found_code(message: &str, fallback: &str) -> String {
    let m = message.to_ascii_lowercase();
    let table = [
        ("image", "InvalidAMIID.NotFound"),
        ("key_name", "InvalidKeyPair.NotFound"),
        ("key pair", "InvalidKeyPair.NotFound"),
        ("volume", "InvalidVolume.NotFound"),
        ("subnet", "InvalidSubnetID.NotFound"),
        ("vpc", "InvalidVpcID.NotFound"),
        ("security group", "InvalidGroup.NotFound"),
        ("security_group", "InvalidGroup.NotFound"),
        ("group_id", "InvalidGroup.NotFound"),
        ("placement group", "InvalidPlacementGroup.Unknown"),
        ("placement_group", "InvalidPlacementGroup.Unknown"),
        ("instance_type", "InvalidInstanceType"),
        ("availability_zone", "InvalidAvailabilityZone"),
        ("zone", "InvalidAvailabilityZone"),
        ("instance", "InvalidInstanceID.NotFound"),
        ("network interface", "InvalidNetworkInterfaceID.NotFound"),
    ];
    let field = m.split(':').next().unwrap_or_default();
    table
        .iter()
        .find(|(k, _)| field.contains(k))
        .or_else(|| table.iter().find(|(k, _)| m.contains(k)))
        .map_or_else(|| fallback.to_string(), |(_, c)| c.to_string())
}

/// The EC2 error of a gRPC status from the call an action maps onto;
/// `not_found` is the action's own not-found code when the message names
/// no other resource.
pub fn from_status(s: &tonic::Status, not_found: &str) -> Ec2Error {
    let msg = s.message().to_string();
    let marker = |codes: &[&str]| {
        codes
            .iter()
            .find(|c| msg.contains(*c))
            .map(|c| c.to_string())
    };
    match s.code() {
        Code::InvalidArgument => {
            let code = marker(&["IdempotentParameterMismatch", "InvalidParameterCombination"])
                .unwrap_or_else(|| "InvalidParameterValue".into());
            Ec2Error::new(400, &code, msg)
        }
        Code::NotFound => Ec2Error::new(400, &not_found_code(&msg, not_found), msg),
        Code::AlreadyExists => {
            let code = if msg.contains("key pair") || msg.contains("key_name") {
                "InvalidKeyPair.Duplicate"
            } else if msg.contains("group") {
                "InvalidGroup.Duplicate"
            } else {
                "InvalidParameterValue"
            };
            Ec2Error::new(400, code, msg)
        }
        Code::FailedPrecondition => {
            let code = marker(&[
                "IncorrectInstanceState",
                "VolumeInUse",
                "DependencyViolation",
                "IncorrectState",
                "InvalidVolume.ZoneMismatch",
            ])
            .unwrap_or_else(|| {
                if msg.contains("instance") {
                    "IncorrectInstanceState".into()
                } else {
                    "IncorrectState".into()
                }
            });
            Ec2Error::new(400, &code, msg)
        }
        Code::ResourceExhausted => {
            let code = if msg.contains("address") {
                "InsufficientFreeAddressesInSubnet"
            } else if msg.contains("size_gib") || msg.contains("disk space") {
                "InsufficientVolumeCapacity"
            } else {
                "InsufficientInstanceCapacity"
            };
            Ec2Error::new(500, code, msg)
        }
        Code::PermissionDenied => Ec2Error::new(403, "UnauthorizedOperation", msg),
        Code::Unauthenticated => Ec2Error::new(401, "AuthFailure", msg),
        Code::Unavailable | Code::DeadlineExceeded => Ec2Error::new(503, "Unavailable", msg),
        _ => Ec2Error::new(500, "InternalError", msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_become_ec2_codes() {
        let c = |s: tonic::Status| from_status(&s, "InvalidInstanceID.NotFound").code;
        assert_eq!(
            c(tonic::Status::not_found(
                "instance_ids: no instance \"i-1\""
            )),
            "InvalidInstanceID.NotFound"
        );
        assert_eq!(
            c(tonic::Status::not_found("image_id: no image \"x\"")),
            "InvalidAMIID.NotFound"
        );
        assert_eq!(
            c(tonic::Status::not_found("key_name: no key pair \"k\"")),
            "InvalidKeyPair.NotFound"
        );
        assert_eq!(
            c(tonic::Status::failed_precondition(
                "volume_id: vol-1 is attached to i-1 (VolumeInUse)"
            )),
            "VolumeInUse"
        );
        assert_eq!(
            c(tonic::Status::invalid_argument(
                "client_token: \"t\" was used with different parameters (IdempotentParameterMismatch)"
            )),
            "IdempotentParameterMismatch"
        );
        let e = from_status(
            &tonic::Status::resource_exhausted("insufficient capacity: no host"),
            "",
        );
        assert_eq!(
            (e.status, e.code.as_str()),
            (500, "InsufficientInstanceCapacity")
        );
        let x = Ec2Error::missing("ImageId").to_xml("r-1");
        assert!(x.contains("<Code>MissingParameter</Code>"), "{x}");
        assert!(x.contains("<RequestID>r-1</RequestID>"), "{x}");
    }

    /// What ModifyInstanceAttribute's refusals of a type or user data
    /// change become (the state's own messages).
    #[test]
    fn modify_refusals_become_ec2_codes() {
        let c = |s: tonic::Status| from_status(&s, "InvalidInstanceID.NotFound");
        let e = c(tonic::Status::failed_precondition(
            "instance_type: i-1 is running, not stopped: its type and user data change only \
             while it is stopped; stop the instance first (IncorrectInstanceState)",
        ));
        assert_eq!((e.status, e.code.as_str()), (400, "IncorrectInstanceState"));
        let e = c(tonic::Status::resource_exhausted(
            "instance_type: InsufficientInstanceCapacity: i-1's host h1 has room for 1 vCPUs \
             and 512 MiB, f1.medium needs 2 vCPUs and 1024 MiB",
        ));
        assert_eq!(
            (e.status, e.code.as_str()),
            (500, "InsufficientInstanceCapacity")
        );
        let e = c(tonic::Status::not_found(
            "instance_type: no instance type \"f9.huge\"",
        ));
        assert_eq!(
            e.code, "InvalidInstanceType",
            "ModifyInstanceAttribute renames it"
        );
    }
}
