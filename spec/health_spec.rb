# frozen_string_literal: true

require "spec_helper"
require "grpc"
require "grpc/health/v1/health_services_pb"

# grpc.health.v1.Health built in and mountable on any Flowctl::Server, checked with the
# official grpc gem's own health stub.
RSpec.describe Flowctl::Health do
  let(:health) { described_class.new }
  let(:server) { Flowctl::Server.new.handle(Flowctl::Health::SERVICE, health) }
  let(:official) { Grpc::Health::V1::Health::Stub.new("127.0.0.1:#{server.port}", :this_channel_is_insecure) }

  before { server.start }
  after { server.stop(grace: 0) }

  def check(service = "")
    official.check(Grpc::Health::V1::HealthCheckRequest.new(service: service), deadline: Time.now + time_limit(5))
  end

  it "answers Check from the official gem's stub: SERVING for the whole server by default" do
    expect(check.status).to eq(:SERVING)
  end

  it "reports the status set for a service, and NOT_FOUND for one never set" do
    health.set("flowctl.v1.ProcessorService", :NOT_SERVING)
    expect(check("flowctl.v1.ProcessorService").status).to eq(:NOT_SERVING)
    expect { check("nope") }.to raise_error(GRPC::NotFound, /unknown service "nope"/)
  end

  it "is NOT_SERVING everywhere after shutdown" do
    health.set("a", :SERVING)
    health.shutdown
    expect([check.status, check("a").status]).to eq(%i[NOT_SERVING NOT_SERVING])
  end

  it "refuses statuses that are not health statuses" do
    expect { health.set("", :HEALTHY) }.to raise_error(ArgumentError, /must be one of :SERVING/)
    expect { health.set(:svc, :SERVING) }.to raise_error(TypeError, /service must be a String/)
  end
end
