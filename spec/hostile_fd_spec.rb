# frozen_string_literal: true

require "spec_helper"
require "rbconfig"
require "socket"
require "timeout"
require "tempfile"

# Issue 17: running out of file descriptors. gRPC core 1.51's listener stops for good after
# accept4 fails with EMFILE (400 idle connections to a server under ulimit -n 256 did it);
# Flowctl::Server notices a listener with connections waiting that it does not take, and
# listens again on the same port.
RSpec.describe "a server out of file descriptors" do
  SERVER_CODE = <<~RUBY
    require "flowctl"
    $stderr.sync = true
    server = Flowctl::Server.new(port: 0)
    server.handle(Flowctl::ControlPlane::Service, Flowctl::ControlPlane::Registry.new)
    puts server.start
    $stdout.flush
    $stdin.read
    server.stop(grace: 1)
  RUBY

  def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)

  it "400 idle connections under ulimit -n 256: serving again within a second of the flood ending" do
    out, child_out = IO.pipe
    child_in, input = IO.pipe
    err = Tempfile.new("fd-server")
    pid = Process.spawn(RbConfig.ruby, "-I#{FLOWCTL_LIB}", "-e", SERVER_CODE, in: child_in, out: child_out, err: err.path,
                        rlimit_nofile: [256, 256])
    [child_out, child_in].each(&:close)
    port = Integer(Timeout.timeout(time_limit(20)) { out.gets })
    flood = Array.new(400) do
      TCPSocket.new("127.0.0.1", port)
    rescue SystemCallError
      nil
    end.compact
    sleep 1.5
    flood.each(&:close)
    ended = now
    result = nil
    until result == true || now - ended > time_limit(10)
      client = Flowctl::ControlPlane::Client.new("127.0.0.1:#{port}", tls: false, timeout: 0.5)
      result = begin
        client.register_processor(processor_id: "p").success
      rescue Flowctl::RPCError => e
        e
      ensure
        client.close
      end
    end
    expect(result).to be(true)
    expect(now - ended).to be < time_limit(1)
    input.close
    _, status = Timeout.timeout(time_limit(20)) { Process.wait2(pid) }
    pid = nil
    expect(status.success?).to be(true), File.read(err.path)
    expect(File.read(err.path)).to include("stopped accepting", "listening again")
  ensure
    flood&.each { |s| s.close unless s.closed? }
    if pid
      Process.kill("KILL", pid)
      Process.wait(pid)
    end
    err&.close!
  end

  it "Server.raise_nofile_limit raises the soft limit to the hard one" do
    code = 'require "flowctl"; Flowctl::Server.raise_nofile_limit; print Process.getrlimit(:NOFILE).join(" ")'
    out = IO.popen([RbConfig.ruby, "-I#{FLOWCTL_LIB}", "-e", code, { rlimit_nofile: [64, 512] }], &:read)
    expect(out).to eq("512 512")
  end
end
