# frozen_string_literal: true

require "spec_helper"
require "flowctl/pipeline"
require "rbconfig"
require "tmpdir"

# The runner's processes and supervision, with stand-in components (real child processes
# that "register" through a file) and in-process links tied to their pids: start-up
# failures, the environment contract, SIGKILL and restart, stop in order, no child left.
module PipelineSpecPids
  def self.alive?(pid)
    Process.kill(0, pid)
    true
  rescue Errno::ESRCH
    false
  end
end

RSpec.describe Flowctl::Pipeline::Runner do
  FAKE = File.expand_path("fixtures/pipeline/fake_component.rb", __dir__)

  # The control plane as the runner sees it: registrations written by the fakes.
  class FileView
    def initialize(dir) = @dir = dir

    def info(id)
      pid, at = File.read(File.join(@dir, id)).split
      Flowctl::Pipeline::ComponentInfo.new(status: :HEALTH_STATUS_HEALTHY, endpoint: "pid:#{pid}",
                                           registered_at: Time.at(at.to_f), metrics: {})
    rescue Errno::ENOENT
      nil
    end
  end

  # Links whose far end is a fake's pid: they break (UNAVAILABLE) when it dies.
  class PidSource
    def initialize(pid, n, delay) = (@pid, @n, @delay = pid, n, delay)
    def open(token) = @start = token ? token.to_i + 1 : 0
    def cancel = @cancelled = true

    def each
      (@start...@n).each do |i|
        raise Flowctl::Cancelled, "cancelled" if @cancelled
        raise Flowctl::Unavailable, "source gone" unless PipelineSpecPids.alive?(@pid)

        sleep @delay
        yield Flowctl::V1::Event.new(id: i.to_s, type: "raw", payload: i.to_s, metadata: {})
      end
    end
  end

  class PidProcessor
    def initialize(pid)
      @pid = pid
      @replies = SizedQueue.new(8)
      @watch = Thread.new do
        sleep 0.01 while PipelineSpecPids.alive?(@pid) && !@replies.closed?
        @dead = !PipelineSpecPids.alive?(@pid)
        @replies.close
      end
    end

    def write(e)
      raise Flowctl::Unavailable, "processor gone" if @dead || !PipelineSpecPids.alive?(@pid)

      @replies.push(e)
    rescue ClosedQueueError
      raise Flowctl::Unavailable, "processor gone"
    end

    def close_write = @replies.close

    def read
      r = @replies.pop
      raise Flowctl::Unavailable, "processor gone" if r.nil? && (@dead || !PipelineSpecPids.alive?(@pid))

      r
    end

    def cancel = @replies.close
  end

  class PidSink
    Response = Struct.new(:events_consumed, :events_failed, :errors)
    def initialize(pid, got) = (@pid, @got = pid, got)
    def cancel; end
    def finish = Response.new(0, 0, [])

    def write(e)
      raise Flowctl::Unavailable, "sink gone" unless PipelineSpecPids.alive?(@pid)

      @got << e.id
    end
  end

  around do |ex|
    Dir.mktmpdir("flowctl-runner") do |dir|
      @dir = dir
      @registry = File.join(dir, "registry")
      @pids = File.join(dir, "pids")
      Dir.mkdir(@registry)
      Dir.mkdir(@pids)
      ex.run
    end
  end

  let(:got) { Queue.new }
  let(:store) { Flowctl::Pipeline::RunStore::Memory.new }

  def definition(spec_yaml, ready_timeout: "10s")
    Flowctl::Pipeline::Definition.parse(<<~YAML, file: "runner.yaml")
      apiVersion: flowctl/v1
      kind: Pipeline
      metadata: {name: fake}
      spec:
        heartbeat_interval: 250ms
        shutdown_grace: 3s
        ready_timeout: #{ready_timeout}
      #{spec_yaml.gsub(/^/, '  ')}
    YAML
  end

  def component(id, mode: nil, extra: "")
    env = { "FAKE_REGISTRY" => @registry, "FAKE_PIDS" => @pids }
    env["FAKE_MODE"] = mode if mode
    "{id: #{id}, command: [#{RbConfig.ruby}, #{FAKE}], env: #{env.to_a.map { |k, v| "#{k}: '#{v}'" }.join(', ').then { |s| "{#{s}}" }}#{extra}}"
  end

  def runner(d, events: 300, delay: 0.0, **opts)
    link = lambda do |c, endpoint|
      pid = endpoint[/\d+/].to_i
      case c.role
      when :source then PidSource.new(pid, events, delay)
      when :processor then PidProcessor.new(pid)
      else PidSink.new(pid, got)
      end
    end
    described_class.new(d, control_plane: "127.0.0.1:1", store: store, out: nil, err: opts.delete(:err) || (ENV["PIPELINE_SPEC_VERBOSE"] ? $stderr : StringIO.new),
                           view: FileView.new(@registry), link: link, **opts)
  end

  def started_pids = Dir.children(@pids).map { |f| f[/\d+\z/].to_i }

  def expect_no_child_left
    expect(Flowctl::Pipeline::Child.running).to eq([])
    started_pids.each { |pid| expect(PipelineSpecPids.alive?(pid)).to be(false), "pid #{pid} still alive" }
  end

  it "starts every component with flowctl run's environment and completes" do
    d = definition("sources: [#{component('gen')}]\nprocessors: [#{component('sq')}]\nsinks: [#{component('out', extra: ', health_port: 19555')}]")
    logs = File.join(@dir, "logs")
    run = runner(d, log_dir: logs).run
    expect(run.status).to eq("COMPLETED"), run.error.to_s
    expect(Array.new(got.size) { got.pop }).to eq((0...300).map(&:to_s))
    expect(run.counts["sq"]).to include("in" => 300, "out" => 300, "failed" => 0, "restarts" => 0)
    env = File.read(File.join(logs, "sq.log"))
    expect(env).to include("ENABLE_FLOWCTL=true\n", "FLOWCTL_ENDPOINT=127.0.0.1:1\n", "FLOWCTL_HEARTBEAT_INTERVAL=250ms\n",
                           "FLOWCTL_SERVICE_ID=sq\n", "FLOWCTL_COMPONENT_ID=sq\n")
    expect(env[/HEALTH_PORT=(\d+)/, 1].to_i).to be > 0
    expect(File.read(File.join(logs, "out.log"))).to include("HEALTH_PORT=19555\n")
    expect(store.get(run.id).status).to eq("COMPLETED")
    expect_no_child_left
  end

  it "says which component exited at once, with its last output, and leaves no child behind" do
    d = definition("sources: [#{component('gen')}]\nprocessors: [#{component('sq', mode: 'exit')}]\nsinks: [#{component('out', mode: 'fork')}]")
    run = runner(d).run
    expect(run.status).to eq("FAILED")
    expect(run.error).to include(%(processor "sq" (#{RbConfig.ruby} #{FAKE}): exited (exited with status 3) before it registered; last output:))
    expect(run.error).to include("    fake sq starting", "    fatal: cannot open the ledger")
    expect(run.error).not_to include('source "gen"')
    expect_no_child_left
  end

  it "says which component printed nothing, and which never registered (bounded wait)" do
    # sh starts at once even on a busy machine; a Ruby fake might take longer than the wait
    d = definition(<<~YAML, ready_timeout: "2s")
      sources: [{id: gen, command: [sh, -c, 'echo fake gen starting; echo $$ > #{@pids}/gen-$$; exec sleep 60']}]
      sinks: [{id: out, command: ["true"]}]
    YAML
    t = Time.now
    run = runner(d).run
    expect(Time.now - t).to be < time_limit(10)
    expect(run.status).to eq("FAILED")
    expect(run.error).to include(%(sink "out" (true): exited (exited with status 0) before it registered; it printed nothing))
    expect(run.error).to include("source \"gen\" (sh -c echo fake gen starting; echo $$ > #{@pids}/gen-$$; exec sleep 60): " \
                                 "did not register as HEALTHY with the control plane within 2.0s (not registered;")
    expect(run.error).to include("last output:\n    fake gen starting")
    expect_no_child_left
  end

  it "restarts a processor killed with SIGKILL mid-run, re-wires it and loses nothing" do
    d = definition("sources: [#{component('gen')}]\nprocessors: [#{component('sq', extra: ', restart: {backoff: 50ms}')}]\nsinks: [#{component('out')}]")
    r = runner(d, events: 400, delay: 0.004)
    killer = Thread.new do
      sleep 0.05 until File.exist?(File.join(@registry, "sq")) && r.router
      sleep 0.4
      pid = File.read(File.join(@registry, "sq")).split.first.to_i
      Process.kill("KILL", pid)
      pid
    end
    run = r.run
    killed = killer.value
    expect(run.status).to eq("COMPLETED"), run.error.to_s
    ids = Array.new(got.size) { got.pop }
    expect(ids.uniq.sort_by(&:to_i)).to eq((0...400).map(&:to_s))
    expect(run.counts["sq"]["restarts"]).to eq(1)
    expect(run.counts["sq"]["reconnects"]).to be >= 1
    expect(started_pids).to include(killed)
    expect_no_child_left
  end

  it "gives up after max_restarts and fails the run naming the component" do
    d = definition("sources: [#{component('gen')}]\nprocessors: [#{component('sq', extra: ', restart: {max_restarts: 0}')}]\nsinks: [#{component('out')}]")
    r = runner(d, events: 10_000, delay: 0.002)
    Thread.new do
      sleep 0.05 until File.exist?(File.join(@registry, "sq")) && r.router
      Process.kill("KILL", File.read(File.join(@registry, "sq")).split.first.to_i)
    end
    run = r.run
    expect(run.status).to eq("FAILED")
    expect(run.error).to match(/processor "sq" .*killed by SIGKILL \(restart policy on-failure, 0 restart\(s\) done\)/)
    expect_no_child_left
  end

  it "stops in order on request (sources first, drain, sinks last) and records STOPPED" do
    d = definition("sources: [#{component('gen')}]\nprocessors: [#{component('sq')}]\nsinks: [#{component('out')}]")
    err = StringIO.new
    r = runner(d, events: 100_000, delay: 0.001, err: err)
    Thread.new do
      sleep 0.05 until r.router && r.router.snapshot["out"]["in"] > 20
      r.request_stop
    end
    run = r.run
    expect(run.status).to eq("STOPPED")
    expect(run.error).to be_nil
    expect(err.string).to include("stopping: sources first, then draining (grace 3.0s)")
    # drained: everything the source produced reached the sink
    expect(got.size).to eq(run.counts["gen"]["out"])
    expect(got.size).to be < 100_000
    expect_no_child_left
  end
end

