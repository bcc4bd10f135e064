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

RSpec.describe "Flowctl::Health Watch" do
  # Queue#pop(timeout:) is Ruby 3.2's
  def pop(queue, seconds)
    deadline = Time.now + seconds
    loop do
      return queue.pop(true)
    rescue ThreadError
      raise "nothing came within #{seconds} s" if Time.now > deadline

      sleep 0.01
    end
  end

  let(:health) { Flowctl::Health.new }
  let(:server) { Flowctl::Server.new.handle(Flowctl::Health::SERVICE, health) }
  let(:official) { Grpc::Health::V1::Health::Stub.new("127.0.0.1:#{server.port}", :this_channel_is_insecure) }

  before { server.start }
  after { server.stop(grace: 0) }

  it "streams the status at once and each change to the official gem's stub, until shutdown" do
    seen = Queue.new
    watcher = Thread.new do
      official.watch(Grpc::Health::V1::HealthCheckRequest.new(service: "svc"),
                     deadline: Time.now + time_limit(10)).each { |r| seen << r.status }
      seen << :ended
    end
    expect(pop(seen, time_limit(5))).to eq(:SERVICE_UNKNOWN)
    health.set("svc", :SERVING)
    expect(pop(seen, time_limit(5))).to eq(:SERVING)
    health.set("svc", :NOT_SERVING)
    expect(pop(seen, time_limit(5))).to eq(:NOT_SERVING)
    health.shutdown
    expect(pop(seen, time_limit(5))).to eq(:ended)
    watcher.join
  end

  # Watch waits for changes and asks call.cancelled? meanwhile: a client that left is seen
  # without any change of status, and its worker is free again.
  it "frees the worker of a watcher that went away, with no change of status" do
    server = Flowctl::Server.new(pool_size: 4).handle(Flowctl::Health::SERVICE, health)
    server.start
    deadline = Time.now + time_limit(5)
    sleep 0.05 until server.stats[:idle] == 4 || Time.now > deadline
    client = Class.new(Flowctl::Client) { use_service Flowctl::Health::SERVICE }.new("127.0.0.1:#{server.port}", tls: false)
    stream = client.watch_stream(service: "")
    expect(stream.read.status).to eq(:SERVING)
    expect(server.stats[:idle]).to be < 4 # the Watch holds a worker
    stream.cancel
    deadline = Time.now + time_limit(5)
    sleep 0.05 until server.stats[:idle] == 4 || Time.now > deadline
    expect(server.stats[:idle]).to eq(4) # every worker is free again
  ensure
    client&.close
    server&.stop(grace: 0)
  end
end
