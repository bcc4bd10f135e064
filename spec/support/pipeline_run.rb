# frozen_string_literal: true

require "tmpdir"

# What the specs that run pipelines of real components share (pipeline_e2e_spec,
# pipeline_self_wired_spec): a scratch directory per example (@dir; the components
# write their pids to @pids), the components' output files, waiting for a condition, and
# whether a component process is left behind.
module PipelineRunHelpers
  def self.included(group)
    group.around do |ex|
      Dir.mktmpdir("flowctl-pipeline") do |dir|
        @dir = dir
        @pids = File.join(dir, "pids")
        Dir.mkdir(@pids)
        ex.run
      end
    end
  end

  def out(name) = File.join(@dir, "#{name}.out")

  def lines(name) = File.exist?(out(name)) ? File.readlines(out(name), chomp: true) : []

  # A component line for the YAML: script and its argument, config keys, extra YAML.
  def component_yaml(id, script, kind, config = {}, extra = "")
    cfg = { "pids_dir" => @pids }.merge(config).map { |k, v| "#{k}: '#{v}'" }.join(", ")
    "{id: #{id}, command: [#{RbConfig.ruby}, #{script}, #{kind}], config: {#{cfg}}#{extra}}"
  end

  def component_pids = Dir.children(@pids).map { |f| f[/\d+\z/].to_i }

  def pid_alive?(pid)
    Process.kill(0, pid)
    true
  rescue Errno::ESRCH
    false
  end

  def expect_no_component_left
    expect(component_pids).not_to be_empty
    component_pids.each { |pid| expect(pid_alive?(pid)).to be(false), "component pid #{pid} is still running" }
  end

  # The runner with its messages kept (PIPELINE_SPEC_VERBOSE=1: the runner's messages and
  # the components' output on stderr); #runner_messages reads them.
  def runner(definition, **opts)
    verbose = ENV["PIPELINE_SPEC_VERBOSE"] == "1"
    @runner_err = verbose ? $stderr : StringIO.new
    Flowctl::Pipeline::Runner.new(definition, out: nil, err: @runner_err, verbose: verbose,
                                              log_dir: verbose ? nil : File.join(@dir, "logs"), **opts)
  end

  def runner_messages = @runner_err.respond_to?(:string) ? @runner_err.string : ""

  def wait_until(seconds, what)
    deadline = Time.now + time_limit(seconds)
    until (v = yield)
      raise "timed out waiting for #{what}" if Time.now > deadline

      sleep 0.05
    end
    v
  end
end
