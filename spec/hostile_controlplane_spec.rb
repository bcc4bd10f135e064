# frozen_string_literal: true

require "spec_helper"
require "rbconfig"
require "tmpdir"
require "timeout"

# Issue 17: nothing a peer sends, and no closed stdout, stops flowctl-controlplane.
RSpec.describe "flowctl-controlplane against odd metrics and a closed stdout" do
  CPH = Flowctl::ControlPlane
  CONTROLPLANE_EXE = File.expand_path("../exe/flowctl-controlplane", __dir__)

  it "Registry#table shows NaN and infinite metrics as sent (they are stored faithfully)" do
    registry = CPH::Registry.new
    registry.register_processor(CPH::RegisterProcessorRequest.new(processor_id: "p1"))
    metrics = { "rate" => Float::NAN, "up" => Float::INFINITY, "down" => -Float::INFINITY, "n" => 3.0 }
    registry.processor_heartbeat(CPH::ProcessorHeartbeatRequest.new(processor_id: "p1", metrics: metrics))
    expect(registry.component(:processor, "p1").metrics["rate"]).to be_nan
    expect(registry.table).to include("rate=NaN", "up=Infinity", "down=-Infinity", "n=3")
  end

  # Starts the exe with its stdout on a pipe; yields [pid, port, stdout reader, stderr path].
  def with_controlplane(*args)
    Dir.mktmpdir do |dir|
      err = File.join(dir, "err")
      r, w = IO.pipe
      pid = Process.spawn(RbConfig.ruby, "-I#{FLOWCTL_LIB}", CONTROLPLANE_EXE, "--port", "0", *args, out: w, err: err)
      w.close
      banner = Timeout.timeout(time_limit(10)) { r.gets }
      port = Integer(banner[/:(\d+) \(/, 1])
      yield pid, port, r, err
    ensure
      r&.close unless r&.closed?
      if pid
        Process.kill("KILL", pid) rescue nil # rubocop:disable Style/RescueModifier
        Process.wait(pid) rescue nil # rubocop:disable Style/RescueModifier
      end
    end
  end

  def alive?(pid) = Process.waitpid(pid, Process::WNOHANG).nil?

  it "a heartbeat with NaN and Infinity metrics: stored, printed, and the control plane goes on" do
    with_controlplane("--interval", "0.1") do |pid, port, out, _err|
      client = CPH::Client.new("127.0.0.1:#{port}", tls: false, timeout: time_limit(5))
      client.register_processor(processor_id: "nan")
      client.processor_heartbeat(processor_id: "nan", metrics: { "rate" => Float::NAN, "up" => Float::INFINITY })
      line = Timeout.timeout(time_limit(10)) { loop { l = out.gets or break; break l if l.include?("rate=") } }
      expect(line).to include("rate=NaN", "up=Infinity")
      sleep 0.3
      expect(alive?(pid)).to be(true)
      expect(client.processor_heartbeat(processor_id: "nan").success).to be(true)
      client.close
    end
  end

  it "stdout closed (| head): the control plane serves on and stops cleanly on SIGTERM" do
    with_controlplane("--interval", "0.05") do |pid, port, out, err|
      out.close # the reader went away: every print now gets EPIPE
      sleep 0.3
      expect(alive?(pid)).to be(true), File.read(err)
      client = CPH::Client.new("127.0.0.1:#{port}", tls: false, timeout: time_limit(5))
      expect(client.register_processor(processor_id: "p").success).to be(true)
      client.close
      Process.kill("TERM", pid)
      _, status = Timeout.timeout(time_limit(10)) { Process.wait2(pid) }
      expect(status.success?).to be(true), File.read(err)
      expect(File.read(err)).to include("stdout closed")
    end
  end
end
