# frozen_string_literal: true

require "spec_helper"
require "rbconfig"

# A build without gRPC core's C++-linkage fork internals (a libgrpc that does not export them,
# or FLOWCTL_NO_GRPC_CXX=1 rake clean compile, which pretends so): everything works except gRPC in a
# forked child, which says so with a Flowctl::Error; the parent is not affected.
RSpec.describe "fork in a build without gRPC core's fork internals", unless: Flowctl::Native.fork_internals? do
  it "tells the child that gRPC cannot be used there, and the parent keeps calling" do
    script = <<~'RUBY'
      require "flowctl"
      server = Flowctl::Server.new(port: 0, tls: false)
      server.handle(Flowctl::ControlPlane::Service, Flowctl::ControlPlane::Registry.new)
      port = server.start
      client = Flowctl::ControlPlane::Client.new("127.0.0.1:#{port}", tls: false)
      client.register_processor(processor_id: "before")
      rd, wr = IO.pipe
      pid = fork do
        rd.close
        begin
          Flowctl::ControlPlane::Client.new("127.0.0.1:#{port}", tls: false)
          wr.write("no error")
        rescue Flowctl::Error => e
          wr.write(e.message)
        end
        exit!(0)
      end
      wr.close
      child = rd.read
      Process.wait(pid)
      parent = 3.times.map { |i| client.register_processor(processor_id: "after-#{i}").processor_id }
      server.stop(grace: 1)
      puts child, parent.join(",")
    RUBY
    out = IO.popen([RbConfig.ruby, "-I", FLOWCTL_LIB, "-e", script], &:read)
    child, parent = out.lines.map(&:chomp)
    expect(child).to match(/gRPC cannot be used in this forked child: this build of flowctl has no gRPC core fork support/)
    expect(parent).to eq("after-0,after-1,after-2")
  end
end

RSpec.describe "fork internals in this build" do
  it "are there unless the build was asked to go without them" do
    expect(Flowctl::Native.fork_internals?).to be(ENV["FLOWCTL_NO_GRPC_CXX"] != "1")
  end
end
