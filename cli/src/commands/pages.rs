//! Every page of a Describe call: send, keep the items, follow
//! `next_token` until it is empty. One implementation of [`Paged`] per
//! paged request.

use ferro_proto::compute::v1 as pb;
use ferro_proto::compute::v1::compute_client::ComputeClient;

use crate::client::{AuthChannel, Client, ClientError};

/// A Describe request that pages.
pub(crate) trait Paged: Clone {
    /// What it lists.
    type Item;
    /// Its answer.
    type Response;
    /// Ask for the page after `token`.
    fn set_token(&mut self, token: String);
    /// Send it.
    async fn send(self, ch: AuthChannel) -> Result<tonic::Response<Self::Response>, tonic::Status>;
    /// The items of an answer and its `next_token`.
    fn split(r: Self::Response) -> (Vec<Self::Item>, String);
}

/// Every item matching `req`, across pages.
pub(crate) async fn list_all<R: Paged>(
    client: &mut Client,
    mut req: R,
) -> Result<Vec<R::Item>, ClientError> {
    let mut all = Vec::new();
    loop {
        let resp = client.call(|ch| req.clone().send(ch)).await?;
        let (items, next) = R::split(resp);
        all.extend(items);
        if next.is_empty() {
            return Ok(all);
        }
        req.set_token(next);
    }
}

macro_rules! paged {
    ($req:ident, $resp:ident, $call:ident, $items:ident, $item:ident) => {
        impl Paged for pb::$req {
            type Item = pb::$item;
            type Response = pb::$resp;
            fn set_token(&mut self, token: String) {
                self.next_token = token;
            }
            async fn send(
                self,
                ch: AuthChannel,
            ) -> Result<tonic::Response<Self::Response>, tonic::Status> {
                ComputeClient::new(ch).$call(self).await
            }
            fn split(r: Self::Response) -> (Vec<Self::Item>, String) {
                (r.$items, r.next_token)
            }
        }
    };
}

paged!(
    DescribeInstancesRequest,
    DescribeInstancesResponse,
    describe_instances,
    instances,
    Instance
);
paged!(
    DescribeHostsRequest,
    DescribeHostsResponse,
    describe_hosts,
    hosts,
    Host
);
paged!(
    DescribeVolumesRequest,
    DescribeVolumesResponse,
    describe_volumes,
    volumes,
    Volume
);
paged!(
    DescribeVpcsRequest,
    DescribeVpcsResponse,
    describe_vpcs,
    vpcs,
    Vpc
);
paged!(
    DescribeSubnetsRequest,
    DescribeSubnetsResponse,
    describe_subnets,
    subnets,
    Subnet
);
paged!(
    DescribeSecurityGroupsRequest,
    DescribeSecurityGroupsResponse,
    describe_security_groups,
    security_groups,
    SecurityGroup
);
paged!(
    DescribeNetworkInterfacesRequest,
    DescribeNetworkInterfacesResponse,
    describe_network_interfaces,
    network_interfaces,
    NetworkInterface
);
